"""Tests of xaiadv.evaluation.metrics: attack success rate (eq. 4.15), norms, detector metrics, summaries."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import sklearn.metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from xaiadv.evaluation.metrics import (
    attack_success_rate,
    cheapest_share_mean,
    equal_error_accuracy,
    mean_confidence,
    norm_summary,
    operating_point,
    perturbation_norms,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)

# --------------------------------------------------------------------------------------------------
# attack_success_rate


def test_asr_excludes_initially_misclassified_samples() -> None:
    """Five samples, three initially correct, one of those flipped: ASR = 1/3.

    Sample 3 is wrong before and after, sample 4 wrong before and right after: neither counts, so the
    naive "wrong after the attack" rate (2/5) and the "changed prediction" rate (3/5) are both wrong.
    """
    y = np.array([0, 1, 2, 3, 4])
    clean = np.array([0, 1, 2, 0, 0])
    adversarial = np.array([9, 1, 2, 0, 4])
    assert attack_success_rate(y, clean, adversarial) == pytest.approx(1 / 3, abs=1e-15)


def test_asr_sample_wrong_before_and_right_after_is_no_success() -> None:
    y = np.array([5, 6])
    clean = np.array([5, 0])  # sample 1 misclassified before the attack
    adversarial = np.array([5, 6])  # ... and "repaired" by it
    assert attack_success_rate(y, clean, adversarial) == 0.0


def test_asr_sample_wrong_before_and_after_is_no_success() -> None:
    y = np.array([5, 6])
    clean = np.array([5, 0])
    adversarial = np.array([5, 1])
    assert attack_success_rate(y, clean, adversarial) == 0.0


@pytest.mark.parametrize(
    ("adversarial", "expected"),
    [([0, 1, 2, 3], 0.0), ([1, 1, 0, 3], 0.5), ([1, 2, 3, 0], 1.0), ([0, 7, 2, 3], 0.25)],
    ids=["none-flipped", "half-flipped", "all-flipped", "one-flipped"],
)
def test_asr_all_correct_before(adversarial: list[int], expected: float) -> None:
    y = np.array([0, 1, 2, 3])
    result = attack_success_rate(y, y.copy(), np.array(adversarial))
    assert isinstance(result, float)
    assert result == expected


@pytest.mark.parametrize("adversarial", [[1, 2, 3], [0, 0, 0]], ids=["adv-equals-y", "adv-wrong"])
def test_asr_none_correct_before_is_nan(adversarial: list[int]) -> None:
    y = np.array([1, 2, 3])
    result = attack_success_rate(y, np.array([0, 0, 0]), np.array(adversarial))
    assert isinstance(result, float)
    assert math.isnan(result)


def test_asr_empty_is_nan() -> None:
    empty = np.array([], dtype=np.int64)
    assert math.isnan(attack_success_rate(empty, empty, empty))


@pytest.mark.parametrize("position", [0, 1, 2], ids=["y", "clean_prediction", "adversarial_prediction"])
def test_asr_length_mismatch_raises(position: int) -> None:
    arrays = [np.array([0, 1, 2, 3]) for _ in range(3)]
    arrays[position] = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="must have one entry per sample"):
        attack_success_rate(*arrays)


def test_asr_rejects_logits_in_place_of_labels() -> None:
    """(N, C) scores instead of (N,) class indices are a shape mismatch, not silently flattened into N*C."""
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="must have one entry per sample"):
        attack_success_rate(y, y, np.eye(3))


def test_asr_does_not_modify_inputs() -> None:
    y, clean, adversarial = np.array([0, 1, 2]), np.array([0, 1, 0]), np.array([1, 1, 0])
    copies = [a.copy() for a in (y, clean, adversarial)]
    attack_success_rate(y, clean, adversarial)
    for array, copy in zip((y, clean, adversarial), copies, strict=True):
        np.testing.assert_array_equal(array, copy)


labels = st.lists(st.tuples(*(st.integers(0, 3),) * 3), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(labels)
def test_asr_matches_a_per_sample_reference(samples: list[tuple[int, int, int]]) -> None:
    """Oracle: count in a plain Python loop over samples, following eq. 4.15 literally."""
    y, clean, adversarial = (np.array(column) for column in zip(*samples, strict=True))
    correct_before = sum(1 for t, c, _ in samples if c == t)
    correct_after = sum(1 for t, c, a in samples if c == t and a == t)
    result = attack_success_rate(y, clean, adversarial)
    if correct_before == 0:
        assert math.isnan(result)
    else:
        assert result == pytest.approx((correct_before - correct_after) / correct_before, abs=1e-15)
        assert 0.0 <= result <= 1.0


# --------------------------------------------------------------------------------------------------
# perturbation_norms

ORDERS = {"L0": 0, "L1": 1, "L2": 2, "Linf": np.inf}


@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (5, 10), (4, 1, 8, 8)], ids=["NCHW", "NF", "digits"])
def test_norms_equal_numpy_linalg_norm_per_sample(rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    x = rng.uniform(0.0, 1.0, shape)
    noise = rng.normal(0.0, 0.1, shape)
    noise[rng.uniform(size=shape) < 0.4] = 0.0  # exact zeros, so L0 is not just the size
    noise[0] = 0.0  # one sample untouched
    x_adv = x + noise
    norms = perturbation_norms(x, x_adv)
    assert set(norms) == set(ORDERS)
    delta = x_adv - x
    for key, order in ORDERS.items():
        expected = np.array([np.linalg.norm(d.ravel(), ord=order) for d in delta])
        assert norms[key].shape == (shape[0],)
        assert norms[key].dtype == np.float64
        np.testing.assert_allclose(norms[key], expected, rtol=1e-12, atol=0.0, err_msg=key)
    np.testing.assert_array_equal(norms["L0"], [np.count_nonzero(d) for d in delta])
    assert norms["L0"][0] == 0.0 and 0.0 < norms["L0"][1:].min() < delta[0].size


def test_norms_zero_perturbation_gives_zeros(rng: np.random.Generator) -> None:
    x = rng.uniform(size=(3, 1, 8, 8))
    norms = perturbation_norms(x, x.copy())
    for key in ORDERS:
        np.testing.assert_array_equal(norms[key], np.zeros(3), err_msg=key)


def test_norms_of_float32_inputs_are_float64_and_exact_on_a_known_delta() -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    x_adv = np.array([[0.5, -0.25, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]], dtype=np.float32)
    norms = perturbation_norms(x, x_adv)
    np.testing.assert_array_equal(norms["L0"], [2.0, 1.0])
    np.testing.assert_array_equal(norms["L1"], [0.75, 1.0])
    np.testing.assert_allclose(norms["L2"], [math.sqrt(0.3125), 1.0], rtol=1e-15)
    np.testing.assert_array_equal(norms["Linf"], [0.5, 1.0])
    assert all(value.dtype == np.float64 for value in norms.values())


def test_norms_do_not_modify_inputs(rng: np.random.Generator) -> None:
    x, x_adv = rng.uniform(size=(2, 5)), rng.uniform(size=(2, 5))
    x_copy, x_adv_copy = x.copy(), x_adv.copy()
    perturbation_norms(x, x_adv)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(x_adv, x_adv_copy)


@pytest.mark.parametrize(
    ("x_shape", "adv_shape"),
    [((2, 5), (2, 6)), ((2, 5), (3, 5)), ((2, 1, 4, 4), (2, 16))],
    ids=["features", "batch", "flattened"],
)
def test_norms_shape_mismatch_raises(x_shape: tuple[int, ...], adv_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"x and x_adv must have the same shape; got \(.*\) and \(.*\)"):
        perturbation_norms(np.zeros(x_shape), np.zeros(adv_shape))


# --------------------------------------------------------------------------------------------------
# Detector metrics: positive class adversarial, flag = score >= threshold

# Small integer scores, so ties within and between the classes are common.
tied_scores = st.lists(st.integers(0, 5), min_size=1, max_size=25)


def _sklearn_roc(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, ...]:
    y = np.concatenate([np.zeros(clean.size), np.ones(adversarial.size)])
    scores = np.concatenate([clean, adversarial]).astype(np.float64)
    return sklearn.metrics.roc_curve(y, scores, drop_intermediate=False)


def _sklearn_auc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    y = np.concatenate([np.zeros(clean.size), np.ones(adversarial.size)])
    return float(sklearn.metrics.roc_auc_score(y, np.concatenate([clean, adversarial]).astype(np.float64)))


def test_roc_curve_hand_case_with_a_tie_between_classes() -> None:
    """0.4 is one clean and one adversarial score twice over: one diagonal step from (0, 1/2) to (2/3, 1)."""
    fpr, tpr, thresholds = roc_curve(np.array([0.1, 0.4, 0.4]), np.array([0.8, 0.4]))
    np.testing.assert_allclose(fpr, [0.0, 0.0, 2 / 3, 1.0], rtol=1e-15, atol=0.0)
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.8, 0.4, 0.1])
    assert fpr.dtype == tpr.dtype == thresholds.dtype == np.float64


@settings(max_examples=80, deadline=None)
@given(tied_scores, tied_scores)
def test_roc_curve_equals_sklearn_point_for_point_with_ties(clean: list[int], adversarial: list[int]) -> None:
    fpr, tpr, thresholds = roc_curve(np.array(clean), np.array(adversarial))
    expected_fpr, expected_tpr, expected_thresholds = _sklearn_roc(np.array(clean), np.array(adversarial))
    np.testing.assert_array_equal(fpr, expected_fpr)
    np.testing.assert_array_equal(tpr, expected_tpr)
    np.testing.assert_array_equal(thresholds, expected_thresholds)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_roc_curve_equals_sklearn_on_continuous_scores(rng: np.random.Generator) -> None:
    clean, adversarial = rng.normal(0.0, 1.0, 300), rng.normal(0.7, 1.0, 200)
    for ours, theirs in zip(roc_curve(clean, adversarial), _sklearn_roc(clean, adversarial), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("clean", "adversarial", "expected"),
    [
        ([0.0, 1.0, 2.0], [3.0, 4.0], 1.0),
        ([3.0, 4.0], [0.0, 1.0, 2.0], 0.0),
        ([2.0, 2.0, 2.0], [2.0, 2.0], 0.5),
        ([0.0, 1.0], [1.0, 2.0], 0.875),  # pairs: 1>0, 1=1 (one half), 2>0, 2>1 -> 3.5 / 4
    ],
    ids=["separated", "reversed", "all-equal", "one-tie"],
)
def test_roc_auc_hand_cases(clean: list[float], adversarial: list[float], expected: float) -> None:
    result = roc_auc(np.array(clean), np.array(adversarial))
    assert isinstance(result, float)
    assert result == pytest.approx(expected, abs=1e-15)


@settings(max_examples=80, deadline=None)
@given(tied_scores, tied_scores)
def test_roc_auc_equals_sklearn_and_the_pairwise_count(clean: list[int], adversarial: list[int]) -> None:
    """Two oracles: scikit-learn, and P(adv > clean) + P(adv == clean) / 2 over all pairs in float64."""
    clean_array, adversarial_array = np.array(clean), np.array(adversarial)
    result = roc_auc(clean_array, adversarial_array)
    pairs = adversarial_array[:, None] - clean_array[None, :]
    pairwise = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert result == pytest.approx(pairwise, abs=1e-12)
    assert result == pytest.approx(_sklearn_auc(clean_array, adversarial_array), abs=1e-12)


def test_roc_auc_equals_sklearn_on_rounded_random_scores(rng: np.random.Generator) -> None:
    clean, adversarial = rng.normal(0.0, 1.0, 400).round(1), rng.normal(0.5, 1.0, 300).round(1)
    assert roc_auc(clean, adversarial) == pytest.approx(_sklearn_auc(clean, adversarial), abs=1e-12)


# clean [0, 1, 1, 2], adversarial [1, 3]: ROC (0,0) (0,1/2) (1/4,1/2) (3/4,1) (1,1); the tie at 1 (two clean,
# one adversarial) is the diagonal from (1/4, 1/2) to (3/4, 1), where interpolation matters.
INTERPOLATION_CASE = (np.array([0.0, 1.0, 1.0, 2.0]), np.array([1.0, 3.0]))


@pytest.mark.parametrize(
    ("fpr", "expected"),
    [(0.0, 0.5), (0.1, 0.5), (0.25, 0.5), (0.5, 0.75), (0.6, 0.85), (0.75, 1.0), (0.9, 1.0), (1.0, 1.0)],
)
def test_tpr_at_fpr_hand_case(fpr: float, expected: float) -> None:
    """At FPR 0 the vertical segment's top (1/2); on the diagonal the straight line, 0.5 + (fpr - 0.25)."""
    result = tpr_at_fpr(*INTERPOLATION_CASE, fpr)
    assert isinstance(result, float)
    assert result == pytest.approx(expected, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=2, max_size=15, unique=True), st.floats(0.0, 1.0))
def test_tpr_at_fpr_distinct_scores_is_the_best_threshold_within_the_fpr(pool: list[int], fpr: float) -> None:
    """Without ties the curve is a staircase: the highest TPR of any threshold whose FPR is <= fpr."""
    scores = np.array(pool, dtype=np.float64)
    clean, adversarial = scores[::2], scores[1::2]
    best = max(float((adversarial >= t).mean()) for t in [np.inf, *scores] if (clean >= t).mean() <= fpr)
    assert tpr_at_fpr(clean, adversarial, fpr) == pytest.approx(best, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(tied_scores, tied_scores, st.floats(0.0, 1.0))
def test_tpr_at_fpr_equals_np_interp_over_sklearn_roc(
    clean: list[int], adversarial: list[int], fpr: float
) -> None:
    """np.interp is unambiguous off the curve's FPR values; on one of them, the highest TPR there counts."""
    expected_fpr, expected_tpr, _ = _sklearn_roc(np.array(clean), np.array(adversarial))
    on_curve = expected_fpr == fpr
    expected = expected_tpr[on_curve].max() if on_curve.any() else np.interp(fpr, expected_fpr, expected_tpr)
    assert tpr_at_fpr(np.array(clean), np.array(adversarial), fpr) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fpr", [-0.01, 1.01, math.nan, math.inf, True, "0.05", None])
def test_tpr_at_fpr_rejects_bad_fpr(fpr: object) -> None:
    with pytest.raises(ValueError, match=r"fpr must be a number in \[0, 1\]"):
        tpr_at_fpr(*INTERPOLATION_CASE, fpr)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("clean", "adversarial", "expected"),
    [
        # Points with |FPR - FNR| = 0.2: t=7 (FPR .2, FNR .4) and t=6 (FPR .2, FNR 0); the tied pair of
        # adversarial 6s makes the jump. The lower max(FPR, FNR) picks t=6, accuracy 0.9 (not 0.7).
        ([9.0, 4.0, 3.0, 2.0, 1.0], [10.0, 8.0, 7.0, 6.0, 6.0], (0.9, 6.0)),
        # Ties between classes at 2: t=3 (FPR 0, FNR .5) and t=2 (FPR .5, FNR 0) tie fully: higher threshold.
        ([0.0, 1.0, 2.0, 2.0], [2.0, 2.0, 3.0, 4.0], (0.75, 3.0)),
        ([0.0, 1.0], [2.0, 3.0], (1.0, 2.0)),  # perfectly separable: the lowest adversarial score
        ([1.0, 1.0], [1.0, 1.0, 1.0], (0.5, 1.0)),  # all tied: flag everything, FPR 1, FNR 0
        ([2.0, 3.0], [0.0, 1.0], (0.0, 2.0)),  # reversed: FPR = FNR = 1 at t=2, every sample wrong
    ],
    ids=["tie-broken-by-max", "cross-class-ties", "separable", "all-equal", "reversed"],
)
def test_equal_error_accuracy_hand_cases(
    clean: list[float], adversarial: list[float], expected: tuple[float, float]
) -> None:
    accuracy, threshold = equal_error_accuracy(np.array(clean), np.array(adversarial))
    assert isinstance(accuracy, float) and isinstance(threshold, float)
    assert accuracy == pytest.approx(expected[0], abs=1e-15)
    assert threshold == expected[1]


@settings(max_examples=80, deadline=None)
@given(tied_scores, tied_scores)
def test_equal_error_accuracy_matches_a_per_threshold_reference(
    clean: list[int], adversarial: list[int]
) -> None:
    """Oracle: each observed score as threshold, exact fractions, ranked by (|FPR-FNR|, max, -threshold)."""
    candidates = []
    for t in set(clean) | set(adversarial):
        false_positive = Fraction(sum(s >= t for s in clean), len(clean))
        false_negative = Fraction(sum(s < t for s in adversarial), len(adversarial))
        key = (abs(false_positive - false_negative), max(false_positive, false_negative), -t)
        candidates.append((key, 1 - (false_positive + false_negative) / 2, float(t)))
    _, expected_accuracy, expected_threshold = min(candidates)
    accuracy, threshold = equal_error_accuracy(np.array(clean), np.array(adversarial))
    assert accuracy == pytest.approx(float(expected_accuracy), abs=1e-12)
    assert threshold == expected_threshold


def test_operating_point_hand_case() -> None:
    fpr, tpr = operating_point(np.array([True, False, False, False]), np.array([True, True, False]))
    assert isinstance(fpr, float) and isinstance(tpr, float)
    assert fpr == 0.25
    assert tpr == pytest.approx(2 / 3, abs=1e-15)


def test_operating_point_at_the_roc_threshold_is_a_curve_point(rng: np.random.Generator) -> None:
    """Flags from score >= threshold land exactly on roc_curve's point for that threshold."""
    clean, adversarial = rng.normal(0.0, 1.0, 50).round(1), rng.normal(1.0, 1.0, 40).round(1)
    fpr, tpr, thresholds = roc_curve(clean, adversarial)
    for index in (1, len(thresholds) // 2, len(thresholds) - 1):
        point = operating_point(clean >= thresholds[index], adversarial >= thresholds[index])
        assert point == (fpr[index], tpr[index])


def _valid_scores() -> dict[str, np.ndarray]:
    return {"clean_scores": np.array([0.0, 1.0]), "adversarial_scores": np.array([1.0, 2.0])}


SCORE_FUNCTIONS: dict[str, Callable[..., object]] = {
    "roc_curve": roc_curve,
    "roc_auc": roc_auc,
    "tpr_at_fpr": lambda clean_scores, adversarial_scores: tpr_at_fpr(clean_scores, adversarial_scores, 0.1),
    "equal_error_accuracy": equal_error_accuracy,
}
BAD_SCORES = {
    "empty": (np.array([]), "is empty"),
    "2-D": (np.zeros((2, 2)), "must be a 1-D array of real numbers"),
    "NaN": (np.array([0.0, np.nan]), "contains NaN or Inf"),
    "Inf": (np.array([np.inf, 0.0]), "contains NaN or Inf"),
    "flags": (np.array([True, False]), "must be a 1-D array of real numbers"),
    "strings": (np.array(["a", "b"]), "must be a 1-D array of real numbers"),
}


@pytest.mark.parametrize("function", SCORE_FUNCTIONS, ids=str)
@pytest.mark.parametrize("argument", ["clean_scores", "adversarial_scores"])
@pytest.mark.parametrize("bad", BAD_SCORES, ids=str)
def test_score_metrics_reject_bad_scores_naming_the_argument(function: str, argument: str, bad: str) -> None:
    arguments = _valid_scores()
    value, message = BAD_SCORES[bad]
    arguments[argument] = value
    with pytest.raises(ValueError, match=f"{argument} {message}"):
        SCORE_FUNCTIONS[function](**arguments)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([], dtype=bool), "is empty"),
        (np.array([1, 0]), "must be a 1-D boolean array"),
        (np.array([0.4, 0.6]), "must be a 1-D boolean array"),
        (np.ones((2, 2), dtype=bool), "must be a 1-D boolean array"),
    ],
    ids=["empty", "integers", "scores", "2-D"],
)
@pytest.mark.parametrize("argument", ["clean_flags", "adversarial_flags"])
def test_operating_point_rejects_bad_flags_naming_the_argument(
    bad: np.ndarray, message: str, argument: str
) -> None:
    arguments = {"clean_flags": np.array([True, False]), "adversarial_flags": np.array([True])}
    arguments[argument] = bad
    with pytest.raises(ValueError, match=f"{argument} {message}"):
        operating_point(**arguments)


def test_detector_metrics_do_not_modify_inputs(rng: np.random.Generator) -> None:
    clean, adversarial = rng.normal(size=20).round(1), rng.normal(size=15).round(1)
    copies = clean.copy(), adversarial.copy()
    roc_curve(clean, adversarial)
    roc_auc(clean, adversarial)
    tpr_at_fpr(clean, adversarial, 0.05)
    equal_error_accuracy(clean, adversarial)
    np.testing.assert_array_equal(clean, copies[0])
    np.testing.assert_array_equal(adversarial, copies[1])


# --------------------------------------------------------------------------------------------------
# norm_summary, cheapest_share_mean, mean_confidence


def test_norm_summary_hand_case_and_numpy_quantiles(rng: np.random.Generator) -> None:
    summary = norm_summary(np.array([4.0, 1.0, 3.0, 2.0]))
    assert summary == {"n": 4, "mean": 2.5, "median": 2.5, "q25": 1.75, "q75": 3.25}
    values = rng.exponential(size=101)
    summary = norm_summary(values)
    assert summary["n"] == 101 and isinstance(summary["n"], int)
    assert summary["mean"] == pytest.approx(values.mean(), rel=1e-15)
    assert summary["median"] == np.median(values)
    assert (summary["q25"], summary["q75"]) == tuple(np.percentile(values, [25, 75]))


def test_norm_summary_empty_is_none_and_json_without_nan() -> None:
    summary = norm_summary(np.array([]))
    assert summary == {"n": 0, "mean": None, "median": None, "q25": None, "q75": None}
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


@pytest.mark.parametrize(
    ("values", "message"),
    [(np.array([1.0, np.nan]), "values contains NaN or Inf"), (np.zeros((2, 2)), "values must be a 1-D")],
    ids=["NaN", "2-D"],
)
def test_norm_summary_rejects_bad_values(values: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        norm_summary(values)


@pytest.mark.parametrize(
    ("n_correct", "asr", "expected"),
    [
        (10, 0.3, 2.0),  # 3 cheapest of [1, 2, 3, 4, 5]
        (10, 0.25, 2.0),  # ceil(2.5) = 3
        (10, 0.5, 3.0),  # all 5
        (10, 0.1 * 3, 2.0),  # 3.0000000000000004 still needs 3, not 4
        (7, 3 / 7, 2.0),
        (10, 0.6, None),  # 6 needed, 5 successes
        (10, 0.0, None),
        (0, 0.5, None),
    ],
)
def test_cheapest_share_mean_hand_cases(n_correct: int, asr: float, expected: float | None) -> None:
    norms = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    result = cheapest_share_mean(norms, n_correct, asr)
    if expected is None:
        assert result is None
    else:
        assert isinstance(result, float)
        assert result == pytest.approx(expected, abs=1e-15)
    np.testing.assert_array_equal(norms, [5.0, 1.0, 4.0, 2.0, 3.0])


def test_cheapest_share_mean_no_successes_is_none() -> None:
    assert cheapest_share_mean(np.array([]), 10, 0.1) is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((np.array([np.nan]), 5, 0.2), "norms_of_successes contains NaN"),
        ((np.zeros((1, 1)), 5, 0.2), "norms_of_successes must be a 1-D"),
        ((np.ones(2), -1, 0.2), "n_correct must be a non-negative integer"),
        ((np.ones(2), 5.0, 0.2), "n_correct must be a non-negative integer"),
        ((np.ones(2), True, 0.2), "n_correct must be a non-negative integer"),
        ((np.ones(2), 5, 1.5), r"asr must be a number in \[0, 1\]"),
        ((np.ones(2), 5, math.nan), r"asr must be a number in \[0, 1\]"),
    ],
    ids=["norms-NaN", "norms-2-D", "n-negative", "n-float", "n-bool", "asr-above-1", "asr-NaN"],
)
def test_cheapest_share_mean_rejects_bad_input(arguments: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cheapest_share_mean(*arguments)  # type: ignore[arg-type]


CONFIDENCE_PROBABILITIES = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]])


def test_mean_confidence_hand_case() -> None:
    """Successful rows 1 and 2: true class 0, 0 -> (0.1 + 0.5) / 2; predicted 1, 2 -> (0.6 + 0.4) / 2."""
    y = np.array([0, 0, 0, 2])
    prediction = np.array([0, 1, 2, 2])
    result = mean_confidence(CONFIDENCE_PROBABILITIES, y, prediction, np.array([False, True, True, False]))
    assert result["true_class"] == pytest.approx(0.3, abs=1e-15)
    assert result["adversarial_class"] == pytest.approx(0.5, abs=1e-15)
    assert all(isinstance(value, float) for value in result.values())


def test_mean_confidence_without_success_is_none() -> None:
    y = np.array([0, 1, 2, 2])
    result = mean_confidence(CONFIDENCE_PROBABILITIES, y, y, np.zeros(4, dtype=bool))
    assert result == {"true_class": None, "adversarial_class": None}


def test_mean_confidence_matches_a_per_sample_reference(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(30, 5))
    probabilities = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    y, prediction = rng.integers(0, 5, 30), probabilities.argmax(1)
    successful = prediction != y
    result = mean_confidence(probabilities, y, prediction, successful)
    rows = [i for i in range(30) if successful[i]]
    assert result["true_class"] == pytest.approx(np.mean([float(probabilities[i, y[i]]) for i in rows]))
    assert result["adversarial_class"] == pytest.approx(
        np.mean([float(probabilities[i, prediction[i]]) for i in rows])
    )


def _confidence_arguments() -> dict[str, np.ndarray]:
    return {
        "probabilities": CONFIDENCE_PROBABILITIES,
        "y": np.array([0, 0, 0, 2]),
        "adversarial_prediction": np.array([0, 1, 2, 2]),
        "successful": np.array([False, True, True, False]),
    }


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("probabilities", np.ones(4), r"probabilities must be real numbers of shape \(N, K\)"),
        ("probabilities", CONFIDENCE_PROBABILITIES * 3.0 - 1.0, "probabilities must be softmax rows"),
        ("probabilities", CONFIDENCE_PROBABILITIES * 0.5, "probabilities must be softmax rows"),
        ("y", np.array([0, 0, 0]), r"y must be \(4,\) integer class indices"),
        ("y", np.array([0.0, 0.0, 0.0, 2.0]), r"y must be \(4,\) integer class indices"),
        ("adversarial_prediction", np.array([0, 1, 2, 3]), r"adversarial_prediction must lie in \[0, 3\)"),
        ("adversarial_prediction", np.array([-1, 1, 2, 2]), r"adversarial_prediction must lie in \[0, 3\)"),
        ("successful", np.array([0, 1, 1, 0]), "successful must be a 1-D boolean array"),
        ("successful", np.array([True, False]), "successful must have one entry per row"),
    ],
    ids=[
        "probs-1-D",
        "logits",
        "rows-not-summing-to-1",
        "y-short",
        "y-float",
        "pred-high",
        "pred-negative",
        "successful-int",
        "successful-short",
    ],
)
def test_mean_confidence_rejects_bad_input(argument: str, value: np.ndarray, message: str) -> None:
    arguments = _confidence_arguments()
    arguments[argument] = value
    with pytest.raises(ValueError, match=message):
        mean_confidence(**arguments)


def test_successes_needed_is_the_float_safe_ceiling() -> None:
    from xaiadv.evaluation.metrics import successes_needed

    assert successes_needed(10, 0.1 * 3) == 3  # 0.1 * 3 * 10 = 3.0000000000000004
    assert successes_needed(7, 3 / 7) == 3
    assert successes_needed(7, 0.5) == 4
    assert successes_needed(4, 0.0) == 0
