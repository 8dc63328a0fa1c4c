"""The report's figures as PNG files, drawn from saved results (plain JSON-like data and numpy arrays).

Re-rendering a report needs only results.json and the npz files, so nothing here takes a live model or
attack. Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never pyplot: no global
figure registry to leak into, safe in threads. Each function validates its input before drawing, writes
one PNG atomically and returns its path; the same input gives the same bytes (no timestamp or version in
the PNG metadata, fixed dpi).
"""

from __future__ import annotations

import io
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xaiadv.plugins.storage import atomic_write

NORMS = ("L0", "L1", "L2", "Linf")
#: Per-iteration series of one attack's trace, as the harness saves them (thesis Figs. 4.6-4.10).
CURVE_KEYS = ("iteration", "asr", *NORMS)
DPI = 100
#: Line styles cycled over series, so that coinciding ones stay visible.
LINESTYLES = ("-", "--", ":", "-.")


def plot_attack_curves(
    curves: Mapping[str, Mapping[str, Sequence[float | None]]],
    path: str | os.PathLike[str],
    *,
    norm: str = "L1",
    title: str = "",
) -> Path:
    """ASR over iterations, ``norm`` over iterations and ``norm`` over ASR, one line per attack.

    The three panels of the thesis's Figs. 4.6-4.10. ``curves`` maps an attack label to its series
    "iteration", "asr" and ``norm`` (the other norms are optional; every series given must have the
    iteration's length; other keys are ignored). None or NaN marks an undefined value, such as a norm
    before the first success, and is drawn as a gap. ASR is a fraction in [0, 1].
    """
    target = png_path(path)
    _check_norm(norm)
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty mapping of attack label -> series")
    checked = {label: _check_curve(label, curve, norm) for label, curve in curves.items()}

    figure = new_figure((13.5, 4.2))
    asr_axes, norm_axes, tradeoff_axes = figure.subplots(1, 3)
    for index, (label, (iteration, asr, values)) in enumerate(checked.items()):
        style = {"color": f"C{index % 10}", "linestyle": LINESTYLES[index // 10 % 4], "label": str(label)}
        asr_axes.plot(iteration, asr, **style)
        norm_axes.plot(iteration, values, **style)
        tradeoff_axes.plot(asr, values, **style)
    asr_axes.set(xlabel="iteration", ylabel="ASR", ylim=(-0.02, 1.02), title="ASR over iterations")
    norm_axes.set(xlabel="iteration", ylabel=f"{norm} norm", title=f"{norm} over iterations")
    tradeoff_axes.set(xlabel="ASR", ylabel=f"{norm} norm", xlim=(-0.02, 1.02), title=f"{norm} over ASR")
    for axes in (asr_axes, norm_axes, tradeoff_axes):
        axes.grid(alpha=0.3)
    handles, labels = asr_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    if title:
        figure.suptitle(title)
    return save_png(figure, target)


def plot_roc(
    rocs: Mapping[str, Mapping[str, Sequence[float] | float]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> Path:
    """One ROC curve per label (an attack the detector faced), its AUC in the legend, chance dashed.

    ``rocs`` maps a label to {"fpr": [...], "tpr": [...], "auc": float}, all in [0, 1], fpr and tpr of
    equal length (as ``sklearn.metrics.roc_curve`` and ``roc_auc_score`` give them).
    """
    target = png_path(path)
    if not isinstance(rocs, Mapping) or not rocs:
        raise ValueError("rocs must be a non-empty mapping of label -> {'fpr', 'tpr', 'auc'}")
    checked = {label: _check_roc(label, roc) for label, roc in rocs.items()}

    figure = new_figure((5.5, 5.5))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="chance")
    for index, (label, (fpr, tpr, auc)) in enumerate(checked.items()):
        axes.plot(
            fpr,
            tpr,
            color=f"C{index % 10}",
            linestyle=LINESTYLES[index // 10 % 4],
            label=f"{label} (AUC = {auc:.3f})",
        )
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="false-positive rate", ylabel="true-positive rate")
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(title or "ROC")
    return save_png(figure, target)


def plot_bypass_curves(
    curves: Mapping[str, Mapping[str, Sequence[float | None]]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> Path:
    """Bypass rate over eps per detector: the non-adaptive attack dashed, the adaptive one solid.

    ``curves`` maps a detector label to {"eps": [...], "non_adaptive": [...], "adaptive": [...]}, of equal
    length, eps finite and > 0, rates in [0, 1] or None (no adaptive attack: a detector without a
    differentiable score, drawn as a gap).
    """
    target = png_path(path)
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty mapping of detector label -> series")
    checked = {label: _check_bypass(label, curve) for label, curve in curves.items()}

    figure = new_figure((6.5, 4.5))
    axes = figure.subplots()
    for index, (label, (eps, plain, adaptive)) in enumerate(checked.items()):
        color = f"C{index % 10}"
        axes.plot(eps, plain, color=color, linestyle="--", marker="o", label=f"{label}, non-adaptive")
        axes.plot(eps, adaptive, color=color, linestyle="-", marker="s", label=f"{label}, adaptive")
    axes.set(xlabel="eps", ylabel="bypass rate", ylim=(-0.02, 1.02), title=title or "Bypass rate over eps")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    return save_png(figure, target)


def plot_examples(
    original: np.ndarray,
    adversarial: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    *,
    n: int = 4,
    labels: Mapping[str, Sequence[str]] | None = None,
    title: str = "",
) -> Path:
    """The first ``n`` samples: their originals on top, then one row per attack with each sample's
    perturbation and adversarial image side by side (a compact grid even for a dozen attacks).

    Images are (N, C, H, W) in [0, 1] with C = 1 (gray) or 3 (RGB); every adversarial batch has the
    original's shape. The perturbation x_adv - x is drawn with a diverging colormap symmetric around 0,
    one scale per attack (its colorbar); for RGB its channel mean, so one colour per pixel. ``labels``
    optionally gives, per attack, at least ``n`` sample titles such as "7 -> 3".
    """
    target = png_path(path)
    x = _check_images(original, "original")
    if not isinstance(adversarial, Mapping) or not adversarial:
        raise ValueError("adversarial must be a non-empty mapping of attack label -> images")
    batches = {
        label: _check_images(images, f"adversarial[{label!r}]") for label, images in adversarial.items()
    }
    for label, images in batches.items():
        if images.shape != x.shape:
            raise ValueError(
                f"adversarial[{label!r}] must have the original's shape {x.shape}; got {images.shape}"
            )
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= x.shape[0]:
        raise ValueError(f"n must be an integer in [1, {x.shape[0]}] (the number of samples); got {n!r}")
    n = int(n)
    titles = _check_labels(labels, batches, n)

    figure = new_figure((2.6 * n + 2.2, 1.45 * (len(batches) + 1) + 0.5))
    grid = figure.subplots(len(batches) + 1, 2 * n, squeeze=False)
    for column in range(n):
        show_image(grid[0, 2 * column], x[column])
        grid[0, 2 * column].set_title(f"sample {column}", fontsize="small")
        grid[0, 2 * column + 1].set_axis_off()
    grid[0, 0].set_ylabel("original", fontsize="small")
    for row, (label, images) in enumerate(batches.items(), start=1):
        delta = (images[:n] - x[:n]).mean(axis=1)
        limit = float(np.abs(delta).max()) or 1.0  # an untouched batch still gets a valid scale
        for column in range(n):
            shown = grid[row, 2 * column].imshow(
                delta[column], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
            )
            show_image(grid[row, 2 * column + 1], images[column])
            if label in titles:
                grid[row, 2 * column + 1].set_title(titles[label][column], fontsize="x-small")
        grid[row, 0].set_ylabel(label, fontsize="small")
        figure.colorbar(shown, ax=list(grid[row]), shrink=0.8, pad=0.01, label="x_adv - x")
    for axes in grid.ravel():
        axes.set_xticks([])
        axes.set_yticks([])
    if title:
        figure.suptitle(title)
    return save_png(figure, target)


def plot_norm_distributions(
    norms: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    norm: str = "L1",
    title: str = "",
) -> Path:
    """Box plot of the ``norm`` of each attack's successful perturbations; "no success" where there are none.

    ``norms`` maps an attack label to one finite, non-negative value per successful sample (an empty list
    is an attack without success). The tick labels carry each attack's count of successes.
    """
    target = png_path(path)
    _check_norm(norm)
    if not isinstance(norms, Mapping) or not norms:
        raise ValueError("norms must be a non-empty mapping of attack label -> values")
    checked = {label: _series(values, f"norms[{label!r}]") for label, values in norms.items()}
    for label, values in checked.items():
        if not (np.isfinite(values) & (values >= 0)).all():
            raise ValueError(f"norms[{label!r}] must hold finite, non-negative values")

    figure = new_figure((max(4.0, 1.3 * len(checked) + 1.5), 4.5))
    axes = figure.subplots()
    positions = np.arange(1, len(checked) + 1)
    filled = [
        (position, values)
        for position, values in zip(positions, checked.values(), strict=True)
        if values.size
    ]
    if filled:
        axes.boxplot([values for _, values in filled], positions=[position for position, _ in filled])
    for position, values in zip(positions, checked.values(), strict=True):
        if not values.size:
            axes.text(position, 0.5, "no success", transform=axes.get_xaxis_transform(), ha="center")
    axes.set_xticks(positions, [f"{label}\n(n={values.size})" for label, values in checked.items()])
    axes.set_xlim(0.5, len(checked) + 0.5)
    axes.set_ylabel(f"{norm} of successful perturbations")
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(title or f"{norm} norm per attack")
    return save_png(figure, target)


def plot_embedding_by_class(
    points: np.ndarray,
    classes: np.ndarray,
    names: Mapping[int, str],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> Path:
    """Seed 001 Fig. 4: 2-D points (N, 2) of clean samples, one colour per class, the classes named.

    ``classes``: (N,) class indices; ``names``: class index -> name for the legend.
    """
    target = png_path(path)
    xy, labels = _check_points(points, classes, "points")
    figure = new_figure((6.4, 5.2))
    axes = figure.subplots()
    for index, label in enumerate(np.unique(labels)):
        mine = labels == label
        name = names.get(int(label), str(label))
        axes.scatter(*xy[mine].T, s=10, color=f"C{index % 10}", label=f"{name} (n={int(mine.sum())})")
    axes.set(xlabel="UMAP 1", ylabel="UMAP 2", title=title or "clean signatures by class")
    axes.legend(loc="best", fontsize="x-small", markerscale=1.5)
    axes.grid(alpha=0.3)
    return save_png(figure, target)


def plot_embedding_attacks(
    clean: np.ndarray,
    clean_classes: np.ndarray,
    adversarial: Mapping[str, tuple[np.ndarray, np.ndarray]],
    shown_class: int,
    path: str | os.PathLike[str],
    *,
    name: str = "",
) -> Path:
    """Seed 001 Figs. 5-6 for one class: a panel per attack, the clean samples of ``shown_class`` beside the
    attack's adversarial examples made from them, every other clean sample in grey behind.

    ``clean``: (N, 2) points with ``clean_classes`` (N,); ``adversarial``: label -> ((M, 2) points, (M,)
    the original class of each); all in one embedding, so every panel shares the axes.
    """
    target = png_path(path)
    xy, labels = _check_points(clean, clean_classes, "clean")
    if not isinstance(adversarial, Mapping) or not adversarial:
        raise ValueError("adversarial must be a non-empty mapping of attack label -> (points, classes)")
    panels = {
        label: _check_points(*pair, f"adversarial[{label!r}]", empty=True)
        for label, pair in adversarial.items()
    }
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure = new_figure((3.4 * columns, 3.2 * rows + 0.4))
    grid = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    mine = labels == shown_class
    said = name or str(shown_class)
    for axes, (label, (points, original)) in zip(grid.ravel(), panels.items(), strict=False):
        turned = original == shown_class
        axes.scatter(*xy[~mine].T, s=4, color="0.85")
        axes.scatter(*xy[mine].T, s=8, color="C0", label=f"clean {said} (n={int(mine.sum())})")
        axes.scatter(
            *points[turned].T, s=14, marker="x", color="C3", label=f"adversarial (n={int(turned.sum())})"
        )
        axes.set_title(label, fontsize="small")
        axes.legend(loc="best", fontsize="xx-small")
        axes.grid(alpha=0.3)
    for axes in grid.ravel()[len(panels) :]:
        axes.set_axis_off()
    figure.suptitle(f"class {said}: clean vs adversarial signatures (UMAP)")
    return save_png(figure, target)


def plot_value_grids(
    rows: Sequence[str],
    columns: Sequence[str],
    grids: Mapping[str, Sequence[Sequence[float | None]]],
    path: str | os.PathLike[str],
    *,
    xlabel: str = "",
) -> Path:
    """Annotated grids side by side on one [0, 1] scale, one per entry of ``grids`` (its title -> a value
    per row and column, None for n/a, left blank): e.g. the retraining study's cross tables, models by
    attacks (fresh ASR, transferred accuracy)."""
    target = png_path(path)
    if not rows or not columns or not isinstance(grids, Mapping) or not grids:
        raise ValueError("rows, columns and grids must be non-empty (grids: title -> values per row)")
    checked = {}
    for title, values in grids.items():
        series = [_series(row, f"grids[{title!r}] row") for row in values]
        if len(series) != len(rows) or any(row.size != len(columns) for row in series):
            raise ValueError(f"grids[{title!r}] must hold {len(rows)} rows of {len(columns)} values each")
        grid = np.array(series)
        if ((grid < 0) | (grid > 1)).any():  # NaN compares False: n/a passes
            raise ValueError(f"grids[{title!r}] must hold values in [0, 1] (or None)")
        checked[title] = grid
    figure = new_figure((0.5 + (2.0 + 1.1 * len(columns)) * len(checked), 1.2 + 0.55 * len(rows)))
    panels = figure.subplots(1, len(checked), squeeze=False)[0]
    for axes, (title, grid) in zip(panels, checked.items(), strict=True):
        axes.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
        axes.set_xticks(range(len(columns)), list(columns), rotation=30, ha="right")
        axes.set_yticks(range(len(rows)), list(rows))
        axes.set(title=title, xlabel=xlabel)
    return save_png(figure, target)


# --------------------------------------------------------------------------------------------------
# validation


def png_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, checked to name a .png file (TypeError / ValueError before any drawing)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or path-like; got {type(path).__name__}")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"path must name a .png file; got {str(target)!r}")
    return target


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")


def _series(values: Sequence[float | None], what: str) -> np.ndarray:
    """A float64 copy of a sequence of numbers, None as NaN (matplotlib draws NaN as a gap)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"{what} must be a sequence of numbers or None; got {type(values).__name__}")
    if not all(value is None or isinstance(value, numbers.Real) for value in values):
        raise TypeError(f"{what} must hold only numbers or None")
    return np.array([np.nan if value is None else value for value in values], dtype=np.float64).reshape(-1)


def _check_curve(
    label: str, curve: Mapping[str, Sequence[float | None]], norm: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(iteration, asr, norm) of one attack's trace, after checking keys, lengths and ranges."""
    if not isinstance(curve, Mapping):
        raise TypeError(f"curves[{label!r}] must be a mapping of series; got {type(curve).__name__}")
    missing = sorted({"iteration", "asr", norm} - set(curve))
    if missing:
        raise ValueError(
            f"curves[{label!r}] lacks the series {missing}; it needs 'iteration', 'asr', {norm!r}"
        )
    series = {key: _series(curve[key], f"curves[{label!r}][{key!r}]") for key in CURVE_KEYS if key in curve}
    lengths = {key: values.size for key, values in series.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"curves[{label!r}]: every series must have the same length; got {lengths}")
    if not np.isfinite(series["iteration"]).all():
        raise ValueError(f"curves[{label!r}]['iteration'] must hold finite numbers, no None")
    asr = series["asr"]
    if ((asr < 0) | (asr > 1)).any():  # NaN compares False: gaps pass
        raise ValueError(f"curves[{label!r}]['asr'] must be fractions in [0, 1] (or None)")
    for key in NORMS:
        if key in series and ((series[key] < 0) | np.isinf(series[key])).any():
            raise ValueError(f"curves[{label!r}][{key!r}] must be finite, non-negative norms (or None)")
    return series["iteration"], asr, series[norm]


def _check_bypass(
    label: str, curve: Mapping[str, Sequence[float | None]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = ("eps", "non_adaptive", "adaptive")
    if not isinstance(curve, Mapping) or not set(keys) <= set(curve):
        raise ValueError(f"curves[{label!r}] must be a mapping with {list(keys)}")
    eps, plain, adaptive = (_series(curve[key], f"curves[{label!r}][{key!r}]") for key in keys)
    if not (eps.size == plain.size == adaptive.size) or eps.size == 0:
        raise ValueError(f"curves[{label!r}]: eps, non_adaptive, adaptive must be non-empty, of one length")
    if not (np.isfinite(eps) & (eps > 0)).all():
        raise ValueError(f"curves[{label!r}]['eps'] must be finite budgets > 0")
    for key, values in (("non_adaptive", plain), ("adaptive", adaptive)):
        if ((values < 0) | (values > 1)).any():  # NaN compares False: gaps pass
            raise ValueError(f"curves[{label!r}][{key!r}] must be rates in [0, 1] (or None)")
    return eps, plain, adaptive


def _check_roc(
    label: str, roc: Mapping[str, Sequence[float] | float]
) -> tuple[np.ndarray, np.ndarray, float]:
    if not isinstance(roc, Mapping) or not {"fpr", "tpr", "auc"} <= set(roc):
        raise ValueError(f"rocs[{label!r}] must be a mapping with 'fpr', 'tpr' and 'auc'")
    fpr, tpr = (_series(roc[key], f"rocs[{label!r}][{key!r}]") for key in ("fpr", "tpr"))
    if fpr.size != tpr.size or fpr.size == 0:
        raise ValueError(
            f"rocs[{label!r}]: fpr and tpr must be non-empty, of equal length; got {fpr.size} and {tpr.size}"
        )
    auc = roc["auc"]
    if not isinstance(auc, numbers.Real) or not 0 <= auc <= 1:
        raise ValueError(f"rocs[{label!r}]['auc'] must be a number in [0, 1]; got {auc!r}")
    for key, values in (("fpr", fpr), ("tpr", tpr)):
        if not ((values >= 0) & (values <= 1)).all():
            raise ValueError(f"rocs[{label!r}][{key!r}] must be rates in [0, 1]")
    return fpr, tpr, float(auc)


def _check_points(
    points: np.ndarray, classes: np.ndarray, what: str, *, empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 (N, 2) finite points and their (N,) integer classes; N > 0 unless ``empty``."""
    xy, labels = np.asarray(points, dtype=np.float64), np.asarray(classes)
    if xy.ndim != 2 or xy.shape[1] != 2 or (not empty and not len(xy)) or not np.isfinite(xy).all():
        raise ValueError(f"{what} must be finite 2-D points shaped (N, 2) with N > 0; got {xy.shape}")
    if labels.shape != (len(xy),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: expected one integer class per point ({len(xy)}); got {labels.shape}")
    return xy, labels


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
    """A float64 copy of an (N, C, H, W) batch with C in {1, 3} and values in [0, 1]."""
    array = np.array(images, dtype=np.float64)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or 0 in array.shape:
        raise ValueError(f"{what} must be non-empty images (N, C, H, W) with C = 1 or 3; got {array.shape}")
    if not ((array >= 0) & (array <= 1)).all():
        raise ValueError(f"{what} must hold values in [0, 1]")
    return array


def _check_labels(
    labels: Mapping[str, Sequence[str]] | None, batches: Mapping[str, np.ndarray], n: int
) -> Mapping[str, Sequence[str]]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(
            f"labels must be a mapping of attack label -> sample titles; got {type(labels).__name__}"
        )
    unknown = sorted(set(labels) - set(batches), key=str)
    if unknown:
        raise ValueError(f"labels names attacks that adversarial lacks: {unknown}")
    for label, titles in labels.items():
        if isinstance(titles, str) or not isinstance(titles, Sequence) or len(titles) < n:
            raise ValueError(f"labels[{label!r}] must be a sequence of at least n = {n} titles")
    return labels


# --------------------------------------------------------------------------------------------------
# drawing and writing


def new_figure(size: tuple[float, float]) -> Figure:
    """A pyplot-free figure of ``size`` inches on an Agg canvas, at the report's dpi; the other figure
    modules (heatmaps, the vanishing study) draw on it and write it with :func:`save_png`."""
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def show_image(axes: Axes, image: np.ndarray) -> None:
    """One (C, H, W) image: gray for C = 1, RGB for C = 3, on the fixed [0, 1] scale."""
    if image.shape[0] == 1:
        axes.imshow(image[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axes.imshow(image.transpose(1, 2, 0), interpolation="nearest")


def save_png(figure: Figure, path: Path) -> Path:
    """Render to PNG bytes without a timestamp or version, then write them atomically."""
    with io.BytesIO() as buffer:
        figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
        data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path
