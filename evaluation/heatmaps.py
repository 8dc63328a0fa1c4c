"""Relevance heatmaps of clean and adversarial images, and the numbers a reader wants from them.

Seed 001 (Fig. 3) shows the LRP heatmap of an image and of its adversarial example and reads them in words:
"the colours practically reversed", "the network focuses on the adverse pixel"; the thesis (A.1) does the
same per attack. Here each of those readings is a number per successful sample:

- ``spearman``: rank correlation of the clean and the adversarial heatmap, both for the original class
  (near 1: the explanation survived the attack; near or below 0: it was reversed);
- ``top_k_overlap``: the share of the clean heatmap's k most relevant values that stay among the
  adversarial heatmap's k most relevant, for the original class;
- ``perturbed_share``: the share of the adversarial heatmap's relevance mass (absolute values), for the
  adversarial class, that lies on the values the attack changed; the share of changed values beside it is
  what a heatmap blind to the perturbation would give.

Heatmaps come from :class:`~xaiadv.plugins.relevance.Relevance` (default the seeds' epsilon/flat
composite). The figure draws them, summed over channels, with a diverging colormap centred on zero (red
positive, blue negative), one symmetric colour scale per row, stated on the figure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.model import Classifier
from xaiadv.plugins.relevance import DEFAULT_COMPOSITE, Relevance

from .figures import new_figure, png_path, save_png, show_image

#: The seeds' heatmap colours: red for positive relevance, blue for negative, white at zero.
COLORMAP = "bwr"
#: The figure's panels: each image, then its heatmaps for the original and for the adversarial class.
COLUMNS = ("clean", "R clean, orig.", "R clean, adv.", "adversarial", "R adv., orig.", "R adv., adv.")


@dataclass(frozen=True)
class Heatmaps:
    """Relevance maps (N, C, H, W), float64: of the clean and of the adversarial image, each for the
    original and for the adversarial class."""

    clean_original: np.ndarray
    clean_adversarial: np.ndarray
    adversarial_original: np.ndarray
    adversarial_adversarial: np.ndarray


def explanation_heatmaps(
    model: nn.Module | Classifier,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    original: torch.Tensor,
    adversarial: torch.Tensor,
    *,
    composite: str = DEFAULT_COMPOSITE,
    batch_size: int = 128,
) -> Heatmaps:
    """The four heatmaps of each (clean, adversarial) pair: ``original`` and ``adversarial`` are the classes
    (N,) before and after the attack."""
    checks.positive_int("batch_size", batch_size)
    if x.shape != x_adv.shape:
        raise ValueError(f"x_adv must be shaped like x {tuple(x.shape)}; got {tuple(x_adv.shape)}")
    relevance = Relevance(Classifier.wrap(model), composite)

    def maps(images: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        parts = [
            relevance(images[i : i + batch_size], target[i : i + batch_size]).double().cpu().numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, *images.shape[1:]))

    return Heatmaps(
        clean_original=maps(x, original),
        clean_adversarial=maps(x, adversarial),
        adversarial_original=maps(x_adv, original),
        adversarial_adversarial=maps(x_adv, adversarial),
    )


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each row pair of ``a`` and ``b`` (N, ...), ties at their mean rank
    (as ``scipy.stats.spearmanr``); NaN for a row that is constant in either."""
    ranks_a, ranks_b = (rankdata(_rows(m), axis=1) for m in _pair(a, b))
    centred_a = ranks_a - ranks_a.mean(1, keepdims=True)
    centred_b = ranks_b - ranks_b.mean(1, keepdims=True)
    denominator = np.sqrt((centred_a**2).sum(1) * (centred_b**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (centred_a * centred_b).sum(1) / denominator, np.nan)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """|top_k(a) ∩ top_k(b)| / k per row: the k largest values of each (ties: the lower index first)."""
    rows_a, rows_b = (_rows(m) for m in _pair(a, b))
    k = checks.positive_int("k", k)
    if k > rows_a.shape[1]:
        raise ValueError(f"k must be at most the values per sample, {rows_a.shape[1]}; got {k}")
    top_a, top_b = (np.argsort(-rows, axis=1, kind="stable")[:, :k] for rows in (rows_a, rows_b))
    hits = (top_a[:, :, None] == top_b[:, None, :]).any(2).sum(1)
    return hits / k


def perturbed_share(relevance: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of each row's |relevance| on the values where ``delta`` is nonzero, share of such values).

    A row without relevance has NaN for its share.
    """
    mass, changed = (_rows(m) for m in _pair(np.abs(relevance), delta))
    perturbed = changed != 0
    total = mass.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, (mass * perturbed).sum(1) / total, np.nan)
    return share, perturbed.mean(1)


def heatmap_numbers(heatmaps: Heatmaps, x: np.ndarray, x_adv: np.ndarray, *, k: int) -> dict[str, np.ndarray]:
    """The per-sample numbers of the module docstring, for the samples of ``heatmaps``."""
    share, changed = perturbed_share(heatmaps.adversarial_adversarial, np.asarray(x_adv) - np.asarray(x))
    return {
        "spearman": spearman(heatmaps.clean_original, heatmaps.adversarial_original),
        "top_k_overlap": top_k_overlap(heatmaps.clean_original, heatmaps.adversarial_original, k),
        "perturbed_share": share,
        "changed_share": changed,
    }


def plot_heatmaps(
    x: np.ndarray,
    x_adv: np.ndarray,
    heatmaps: Heatmaps,
    titles: list[str],
    path: str | os.PathLike[str],
    *,
    columns: tuple[str, str, str, str, str, str] = COLUMNS,
) -> Path:
    """One row per sample: clean image, its heatmaps for the original and the adversarial class, the
    adversarial image and its two heatmaps; ``titles`` name each row (e.g. "Coat -> Shirt").

    ``columns``: the six panels' titles, for another reading of the four maps (the retraining study draws
    the clear and the immune model's heatmap of each image, for the original class).
    """
    target = png_path(path)
    n = len(x)
    if not n or len(x_adv) != n or len(titles) != n or len(heatmaps.clean_original) != n:
        raise ValueError(f"x, x_adv, heatmaps and titles must hold the same n > 0 samples; got {n}")
    if len(columns) != 6:
        raise ValueError(f"columns must title the six panels of a row; got {len(columns)}")
    figure = new_figure((12.0, 2.1 * n))
    grid = figure.subplots(n, 6, squeeze=False)
    for row in range(n):
        maps = [getattr(heatmaps, name)[row] for name in Heatmaps.__dataclass_fields__]
        scale = max(float(np.abs(m).max()) for m in maps) or 1.0
        images = (x[row], maps[0], maps[1], x_adv[row], maps[2], maps[3])
        for column, (axes, image) in enumerate(zip(grid[row], images, strict=True)):
            axes.set_xticks([])
            axes.set_yticks([])
            if column in (0, 3):
                show_image(axes, np.clip(np.asarray(image, dtype=np.float64), 0, 1))
            else:
                axes.imshow(np.asarray(image).sum(0), cmap=COLORMAP, vmin=-scale, vmax=scale)
            if row == 0:
                axes.set_title(columns[column], fontsize=9)
        grid[row][0].set_ylabel(titles[row], fontsize=9)
        grid[row][-1].text(
            1.05,
            0.5,
            f"|R| <= {scale:.3g}",
            transform=grid[row][-1].transAxes,
            fontsize=8,
            va="center",
            rotation=90,
        )
    return save_png(figure, target)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"expected two batches (N, ...) of one shape; got {a.shape} and {b.shape}")
    return a, b


def _rows(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(batch.shape[0], -1)
