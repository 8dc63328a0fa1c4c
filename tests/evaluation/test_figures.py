"""Tests of xaiadv.evaluation.figures: valid, deterministic PNGs from plain data, validated before work."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.image
import matplotlib.pyplot as plt  # only to check that no figure is left registered
import numpy as np
import pytest

from xaiadv.evaluation.figures import (
    plot_attack_curves,
    plot_examples,
    plot_norm_distributions,
    plot_roc,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _curves() -> dict[str, dict[str, list[float | None]]]:
    """Two attacks' traces over six iterations; norms undefined before the first success."""
    return {
        "LRP-grad": {
            "iteration": [0, 1, 2, 3, 4, 5],
            "asr": [0.0, 0.2, 0.5, 0.7, 0.9, 1.0],
            "L0": [None, 3.0, 5.0, 8.0, 9.0, 9.0],
            "L1": [None, 0.4, 0.9, 1.3, 1.5, 1.6],
            "L2": [None, 0.2, 0.3, 0.4, 0.45, 0.5],
            "Linf": [None, 0.1, 0.1, 0.1, 0.1, 0.1],
        },
        "IFGSM": {
            "iteration": [0, 1, 2, 3, 4, 5],
            "asr": [0.0, 0.1, 0.3, 0.6, 0.8, 0.85],
            "L0": [None, 64.0, 64.0, 64.0, 64.0, 64.0],
            "L1": [None, 2.0, 4.0, 6.0, 8.0, 10.0],
            "L2": [None, 0.3, 0.5, 0.8, 1.0, 1.2],
            "Linf": [None, 0.05, 0.1, 0.15, 0.2, 0.25],
        },
    }


def _rocs() -> dict[str, dict[str, Any]]:
    return {
        "LRP-grad": {"fpr": [0.0, 0.1, 0.4, 1.0], "tpr": [0.0, 0.6, 0.9, 1.0], "auc": 0.85},
        "IFGSM": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.7, 1.0], "auc": 0.6},
    }


def _images(rng: np.random.Generator, channels: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Five 6x6 images in [0, 1] and two attacks' adversarials, clipped to [0, 1]."""
    original = rng.random((5, channels, 6, 6)).astype(np.float32)
    adversarial = {
        "LRP-grad": np.clip(original + rng.normal(0, 0.1, original.shape), 0, 1).astype(np.float32),
        "IFGSM": np.clip(original + 0.05 * rng.choice([-1, 1], original.shape), 0, 1).astype(np.float32),
    }
    return original, adversarial


def _norms() -> dict[str, list[float]]:
    return {"LRP-grad": [0.5, 0.7, 0.8, 1.2, 3.0], "IFGSM": [2.0, 2.5], "LRP-flip": []}


def _read_png(path: Path) -> np.ndarray:
    """The PNG at ``path`` as an (H, W, 3 or 4) array, after checking its signature."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[2] in (3, 4)
    assert image.shape[0] > 50
    assert image.shape[1] > 50
    return image


#: One call of each figure function on valid data: (name, function of (path, rng)).
CASES: list[tuple[str, Callable[[Path, np.random.Generator], Path]]] = [
    ("attack_curves", lambda path, rng: plot_attack_curves(_curves(), path, title="digits")),
    ("attack_curves_L2", lambda path, rng: plot_attack_curves(_curves(), path, norm="L2")),
    ("roc", lambda path, rng: plot_roc(_rocs(), path, title="kNN")),
    ("examples_gray", lambda path, rng: plot_examples(*_images(rng), path, n=3)),
    ("examples_rgb", lambda path, rng: plot_examples(*_images(rng, channels=3), path, n=2)),
    ("norm_distributions", lambda path, rng: plot_norm_distributions(_norms(), path, norm="L2")),
]
CASE_IDS = [name for name, _ in CASES]


@pytest.mark.parametrize("case", [case for _, case in CASES], ids=CASE_IDS)
def test_writes_one_readable_png_the_same_bytes_each_time(
    case: Callable[[Path, np.random.Generator], Path], tmp_path: Path
) -> None:
    path = tmp_path / "figure.png"
    result = case(path, np.random.default_rng(0))
    assert result == path
    image = _read_png(path)
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 10  # something was drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]  # no temp file left behind
    assert plt.get_fignums() == []
    again = case(tmp_path / "again.png", np.random.default_rng(0)).read_bytes()
    assert again == path.read_bytes()
    assert b"Software" not in again  # no version stamp that would change with matplotlib


def test_accepts_str_path_and_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "report" / "figures" / "roc.png"
    result = plot_roc(_rocs(), str(path))
    assert result == path
    _read_png(path)


def test_overwrites_an_existing_figure(tmp_path: Path) -> None:
    path = tmp_path / "roc.png"
    path.write_bytes(b"stale")
    plot_roc(_rocs(), path)
    _read_png(path)


@pytest.mark.parametrize("name", ["figure.pdf", "figure", "figure.png.tmp"])
def test_rejects_a_path_that_is_not_png(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"path must name a \.png file"):
        plot_roc(_rocs(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_rejects_a_path_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="path must be a str or path-like"):
        plot_roc(_rocs(), 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# plot_attack_curves


def test_curves_none_is_a_gap_like_nan(tmp_path: Path) -> None:
    """None and NaN draw the same gap; filling the gap changes the figure, so the value was not dropped."""
    gaps, nans = _curves(), _curves()
    for curves, value in ((gaps, None), (nans, float("nan"))):
        curves["IFGSM"]["L1"][3] = value
        curves["IFGSM"]["asr"][2] = value
    with_none = plot_attack_curves(gaps, tmp_path / "none.png").read_bytes()
    with_nan = plot_attack_curves(nans, tmp_path / "nan.png").read_bytes()
    without_gap = plot_attack_curves(_curves(), tmp_path / "filled.png").read_bytes()
    assert with_none == with_nan
    assert with_none != without_gap


def test_curves_norm_selects_the_series(tmp_path: Path) -> None:
    """Changing the L2 series changes the L2 figure and leaves the L1 figure as it was."""
    changed = _curves()
    changed["LRP-grad"]["L2"] = [None, 9.0, 9.0, 9.0, 9.0, 9.0]
    l1 = plot_attack_curves(_curves(), tmp_path / "l1.png", norm="L1").read_bytes()
    l1_changed = plot_attack_curves(changed, tmp_path / "l1c.png", norm="L1").read_bytes()
    l2 = plot_attack_curves(_curves(), tmp_path / "l2.png", norm="L2").read_bytes()
    l2_changed = plot_attack_curves(changed, tmp_path / "l2c.png", norm="L2").read_bytes()
    assert l1 == l1_changed
    assert l2 != l2_changed


def test_curves_need_only_iteration_asr_and_the_chosen_norm(tmp_path: Path) -> None:
    curves = {"IFGSM": {"iteration": [0, 1, 2], "asr": [0.0, None, 0.5], "Linf": [None, None, 0.1]}}
    _read_png(plot_attack_curves(curves, tmp_path / "linf.png", norm="Linf"))


def test_curves_accept_numpy_series(tmp_path: Path) -> None:
    """Series loaded back from npz are arrays, not lists."""
    curves = {"IFGSM": {"iteration": np.arange(4), "asr": np.linspace(0, 1, 4), "L1": np.full(4, np.nan)}}
    _read_png(plot_attack_curves(curves, tmp_path / "numpy.png"))


def test_curves_leave_the_callers_data_unchanged(tmp_path: Path) -> None:
    curves = _curves()
    expected = copy.deepcopy(curves)
    plot_attack_curves(curves, tmp_path / "curves.png")
    assert curves == expected


def _curves_with(attack: str, key: str, value: Any) -> dict[str, dict[str, Any]]:
    curves: dict[str, dict[str, Any]] = _curves()
    curves[attack][key] = value
    return curves


@pytest.mark.parametrize(
    ("curves", "norm", "error", "match"),
    [
        ({}, "L1", ValueError, "curves must be a non-empty mapping"),
        (_curves(), "L3", ValueError, r"norm must be one of \('L0', 'L1', 'L2', 'Linf'\)"),
        (_curves(), "l1", ValueError, "norm must be one of"),
        (_curves_with("IFGSM", "L1", [1.0, 2.0]), "L1", ValueError, "same length"),
        (_curves_with("IFGSM", "L0", [1.0] * 7), "L1", ValueError, "same length"),  # an unchosen norm too
        ({"A": {"iteration": [0], "asr": [0.1]}}, "L1", ValueError, r"lacks the series \['L1'\]"),
        ({"A": {"asr": [0.1], "L2": [1.0]}}, "L2", ValueError, r"lacks the series \['iteration'\]"),
        (_curves_with("IFGSM", "iteration", [0, 1, None, 3, 4, 5]), "L1", ValueError, "finite numbers"),
        (_curves_with("IFGSM", "asr", [0, 10, 20, 30, 40, 50]), "L1", ValueError, r"fractions in \[0, 1\]"),
        (_curves_with("IFGSM", "L1", [None, -1, 1, 1, 1, 1]), "L1", ValueError, "non-negative norms"),
        (_curves_with("IFGSM", "L2", [None, 1, float("inf"), 1, 1, 1]), "L1", ValueError, "finite"),
        (_curves_with("IFGSM", "L1", ["a", 1, 1, 1, 1, 1]), "L1", TypeError, "only numbers or None"),
        (_curves_with("IFGSM", "L1", "abcdef"), "L1", TypeError, "sequence of numbers"),
        ({"A": [0.1, 0.2]}, "L1", TypeError, "must be a mapping of series"),
    ],
    ids=[
        "empty",
        "unknown-norm",
        "lowercase-norm",
        "short-norm",
        "long-other-norm",
        "missing-norm",
        "missing-iteration",
        "none-iteration",
        "asr-in-percent",
        "negative-norm",
        "infinite-norm",
        "string-value",
        "string-series",
        "curve-not-mapping",
    ],
)
def test_curves_bad_input_raises_before_writing(
    curves: Any, norm: str, error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        plot_attack_curves(curves, tmp_path / "curves.png", norm=norm)
    assert list(tmp_path.iterdir()) == []
    assert plt.get_fignums() == []


# --------------------------------------------------------------------------------------------------
# plot_roc


def test_roc_draws_the_auc(tmp_path: Path) -> None:
    """Only the AUC differs, so only the legend text can tell the two figures apart."""
    other = _rocs()
    other["IFGSM"]["auc"] = 0.7
    first = plot_roc(_rocs(), tmp_path / "first.png").read_bytes()
    second = plot_roc(other, tmp_path / "second.png").read_bytes()
    assert first != second


def test_roc_accepts_sklearn_output(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(3)
    truth = np.r_[np.zeros(30), np.ones(30)]
    score = truth + rng.normal(0, 0.8, truth.size)
    fpr, tpr, _ = roc_curve(truth, score)
    rocs = {"LRP-grad": {"fpr": fpr, "tpr": tpr, "auc": roc_auc_score(truth, score)}}
    _read_png(plot_roc(rocs, tmp_path / "sklearn.png"))


def _roc_with(key: str, value: Any) -> dict[str, dict[str, Any]]:
    rocs = _rocs()
    rocs["IFGSM"][key] = value
    return rocs


@pytest.mark.parametrize(
    ("rocs", "error", "match"),
    [
        ({}, ValueError, "rocs must be a non-empty mapping"),
        ({"A": {"fpr": [0, 1], "tpr": [0, 1]}}, ValueError, "with 'fpr', 'tpr' and 'auc'"),
        (_roc_with("tpr", [0.0, 1.0]), ValueError, "equal length; got 3 and 2"),
        (_roc_with("fpr", []), ValueError, "non-empty, of equal length"),
        (_roc_with("fpr", [0.0, 50.0, 100.0]), ValueError, r"'fpr'\] must be rates in \[0, 1\]"),
        (_roc_with("tpr", [0.0, None, 1.0]), ValueError, r"'tpr'\] must be rates in \[0, 1\]"),
        (_roc_with("auc", 1.5), ValueError, r"'auc'\] must be a number in \[0, 1\]"),
        (_roc_with("auc", float("nan")), ValueError, r"'auc'\] must be a number in \[0, 1\]"),
        (_roc_with("auc", "0.9"), ValueError, r"'auc'\] must be a number in \[0, 1\]"),
    ],
    ids=["empty", "no-auc", "length", "empty-fpr", "percent", "none-tpr", "auc-range", "auc-nan", "auc-str"],
)
def test_roc_bad_input_raises_before_writing(
    rocs: Any, error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        plot_roc(rocs, tmp_path / "roc.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# plot_examples


def test_examples_grid_grows_with_attacks_and_samples(rng: np.random.Generator, tmp_path: Path) -> None:
    """One row per attack below the originals (taller), two columns per sample (wider)."""
    original, adversarial = _images(rng)
    one = _read_png(plot_examples(original, {"A": adversarial["IFGSM"]}, tmp_path / "one.png", n=2))
    two = _read_png(plot_examples(original, adversarial, tmp_path / "two.png", n=2))
    wide = _read_png(plot_examples(original, adversarial, tmp_path / "wide.png", n=5))
    assert two.shape[0] > 1.25 * one.shape[0]  # 3 rows of images against 2
    assert wide.shape[0] == two.shape[0]
    assert wide.shape[1] > two.shape[1]


def _reddish_and_bluish(image: np.ndarray) -> tuple[int, int]:
    red, blue = image[..., 0], image[..., 2]
    return int((red > blue + 0.2).sum()), int((blue > red + 0.2).sum())


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["brighter", "darker"])
def test_examples_perturbation_is_adversarial_minus_original(
    sign: float, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Gray images leave colour only to the diverging perturbation map: x_adv > x reads red, x_adv < x blue.

    The colorbar shows both ends of the symmetric scale, but the four perturbation panels outweigh it.
    """
    original = 0.3 + 0.4 * rng.random((4, 1, 6, 6))
    adversarial = {"A": original + sign * 0.2}
    image = _read_png(plot_examples(original, adversarial, tmp_path / "sign.png", n=4))
    reddish, bluish = _reddish_and_bluish(image)
    if sign > 0:
        assert reddish > 3 * bluish
    else:
        assert bluish > 3 * reddish


def test_examples_sample_titles_are_drawn(rng: np.random.Generator, tmp_path: Path) -> None:
    original, adversarial = _images(rng)
    plain = plot_examples(original, adversarial, tmp_path / "plain.png", n=2).read_bytes()
    titled = plot_examples(
        original, adversarial, tmp_path / "titled.png", n=2, labels={"IFGSM": ["7 -> 3", "1 -> 1", "unused"]}
    ).read_bytes()
    assert plain != titled


def test_examples_leave_the_callers_arrays_unchanged(rng: np.random.Generator, tmp_path: Path) -> None:
    """Read-only inputs would raise on any in-place write; the values are compared as well."""
    original, adversarial = _images(rng, channels=3)
    expected = original.copy(), {label: images.copy() for label, images in adversarial.items()}
    for array in (original, *adversarial.values()):
        array.setflags(write=False)
    plot_examples(original, adversarial, tmp_path / "examples.png", n=3)
    np.testing.assert_array_equal(original, expected[0])
    for label, images in adversarial.items():
        np.testing.assert_array_equal(images, expected[1][label])
        assert images.dtype == np.float32
        assert not images.flags.writeable


def test_examples_accept_an_untouched_batch(rng: np.random.Generator, tmp_path: Path) -> None:
    """A zero perturbation (an attack that never moved) still gets a valid colour scale."""
    original, _ = _images(rng)
    _read_png(plot_examples(original, {"none": original.copy()}, tmp_path / "zero.png", n=1))


def _examples_arguments(rng: np.random.Generator, **changes: Any) -> dict[str, Any]:
    original, adversarial = _images(rng)
    arguments: dict[str, Any] = {"original": original, "adversarial": adversarial, "n": 2, "labels": None}
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"original": np.zeros((5, 6, 6))}, ValueError, r"original must be .* \(N, C, H, W\)"),
        ({"original": np.zeros((5, 2, 6, 6))}, ValueError, "C = 1 or 3; got"),
        ({"original": np.zeros((0, 1, 6, 6))}, ValueError, "non-empty images"),
        ({"original": np.full((5, 1, 6, 6), 255.0)}, ValueError, r"original must hold values in \[0, 1\]"),
        ({"adversarial": {}}, ValueError, "adversarial must be a non-empty mapping"),
        ({"adversarial": {"A": np.zeros((5, 1, 6, 7))}}, ValueError, r"original's shape \(5, 1, 6, 6\)"),
        ({"adversarial": {"A": np.zeros((4, 1, 6, 6))}}, ValueError, "original's shape"),
        ({"adversarial": {"A": np.full((5, 1, 6, 6), -0.1)}}, ValueError, r"'A'\] must hold values in"),
        ({"n": 6}, ValueError, r"n must be an integer in \[1, 5\]"),
        ({"n": 0}, ValueError, r"n must be an integer in \[1, 5\]"),
        ({"n": 2.0}, ValueError, "n must be an integer"),
        ({"n": True}, ValueError, "n must be an integer"),
        ({"labels": {"LRP-flip": ["a", "b"]}}, ValueError, r"adversarial lacks: \['LRP-flip'\]"),
        ({"labels": {"IFGSM": ["7 -> 3"]}}, ValueError, "at least n = 2 titles"),
        ({"labels": {"IFGSM": "73"}}, ValueError, "at least n = 2 titles"),
        ({"labels": ["7 -> 3", "1 -> 1"]}, TypeError, "labels must be a mapping"),
    ],
    ids=[
        "3d",
        "two-channels",
        "no-samples",
        "0-255",
        "no-attacks",
        "adv-width",
        "adv-count",
        "adv-range",
        "n-too-large",
        "n-zero",
        "n-float",
        "n-bool",
        "labels-unknown-attack",
        "labels-short",
        "labels-string",
        "labels-list",
    ],
)
def test_examples_bad_input_raises_before_writing(
    changes: dict[str, Any], error: type[Exception], match: str, rng: np.random.Generator, tmp_path: Path
) -> None:
    arguments = _examples_arguments(rng, **changes)
    with pytest.raises(error, match=match):
        plot_examples(
            arguments["original"],
            arguments["adversarial"],
            tmp_path / "examples.png",
            n=arguments["n"],
            labels=arguments["labels"],
        )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# plot_norm_distributions


def test_norm_distributions_all_without_success(tmp_path: Path) -> None:
    _read_png(plot_norm_distributions({"A": [], "B": ()}, tmp_path / "none.png"))


def test_norm_distributions_an_empty_attack_still_takes_its_place(tmp_path: Path) -> None:
    """Adding an attack without success changes the figure: it gets a slot and "no success"."""
    norms = _norms()
    without = {label: values for label, values in norms.items() if values}
    with_empty = plot_norm_distributions(norms, tmp_path / "with.png").read_bytes()
    without_empty = plot_norm_distributions(without, tmp_path / "without.png").read_bytes()
    assert with_empty != without_empty


def test_norm_distributions_leave_the_callers_data_unchanged(tmp_path: Path) -> None:
    norms = {"A": np.array([3.0, 1.0, 2.0]), "B": [5.0, 4.0]}
    plot_norm_distributions(norms, tmp_path / "norms.png")
    np.testing.assert_array_equal(norms["A"], [3.0, 1.0, 2.0])  # not sorted in place
    assert norms["B"] == [5.0, 4.0]


@pytest.mark.parametrize(
    ("norms", "norm", "error", "match"),
    [
        ({}, "L1", ValueError, "norms must be a non-empty mapping"),
        (_norms(), "L3", ValueError, "norm must be one of"),
        ({"A": [1.0, -0.5]}, "L1", ValueError, "finite, non-negative"),
        ({"A": [1.0, None]}, "L1", ValueError, "finite, non-negative"),
        ({"A": [1.0, float("inf")]}, "L1", ValueError, "finite, non-negative"),
        ({"A": 1.0}, "L1", TypeError, "sequence of numbers"),
    ],
    ids=["empty", "unknown-norm", "negative", "none", "infinite", "scalar"],
)
def test_norm_distributions_bad_input_raises_before_writing(
    norms: Any, norm: str, error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        plot_norm_distributions(norms, tmp_path / "norms.png", norm=norm)
    assert list(tmp_path.iterdir()) == []
