"""Attack metrics (thesis eqs. 4.15, 2.26-2.28), detector metrics (ROC, AUC, EER) and table summaries."""

from __future__ import annotations

import math

import numpy as np


def attack_success_rate(
    y: np.ndarray, clean_prediction: np.ndarray, adversarial_prediction: np.ndarray
) -> float:
    """ASR = (n_TP(t=0) - n_TP(t=x)) / n_TP(t=0) over the initially correct samples (thesis eq. 4.15).

    Samples the model misclassified before the attack are excluded, so the classifier's own errors do not
    count as successes. NaN when no sample was initially correct.
    """
    y, clean_prediction, adversarial_prediction = (
        np.asarray(a) for a in (y, clean_prediction, adversarial_prediction)
    )
    if y.ndim != 1 or not y.shape == clean_prediction.shape == adversarial_prediction.shape:
        raise ValueError(
            "y, clean_prediction and adversarial_prediction must have one entry per sample: indices (N,)"
        )
    initially_correct = clean_prediction == y
    if not initially_correct.any():
        return float("nan")
    still_correct = initially_correct & (adversarial_prediction == y)
    return float((initially_correct.sum() - still_correct.sum()) / initially_correct.sum())


def perturbation_norms(x: np.ndarray, x_adv: np.ndarray) -> dict[str, np.ndarray]:
    """L0, L1, L2 and Linf of x_adv - x per sample, in input units (float64)."""
    x, x_adv = np.asarray(x, dtype=np.float64), np.asarray(x_adv, dtype=np.float64)
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv must have the same shape; got {x.shape} and {x_adv.shape}")
    delta = (x_adv - x).reshape(x.shape[0], int(np.prod(x.shape[1:])))
    magnitude = np.abs(delta)
    return {
        "L0": (magnitude > 0).sum(1).astype(np.float64),
        "L1": magnitude.sum(1),
        "L2": np.sqrt((delta**2).sum(1)),
        "Linf": magnitude.max(1, initial=0.0),
    }


# --------------------------------------------------------------------------------------------------
# Detector metrics (the seeds' detector tables: AUC, TPR at an FPR, Carrara Table 2's EER accuracy,
# I-defender's ID-95/99): the positive class is adversarial and a higher score means more adversarial.
# A sample is flagged when score >= threshold,
# the convention of scikit-learn's roc_curve (plugins/calibration.py flags score > threshold instead).


def roc_curve(
    clean_scores: np.ndarray, adversarial_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one ROC point per distinct score, thresholds decreasing, flag = score >= t.

    Starts at (0, 0) with threshold +inf (nothing flagged) and ends at (1, 1) with the lowest score;
    tied scores form one point, so a tie between classes is one diagonal step. The same points as
    ``sklearn.metrics.roc_curve(y, s, drop_intermediate=False)`` with y = 1 for adversarial.
    """
    false_positives, true_positives, thresholds = _roc_counts(clean_scores, adversarial_scores)
    return false_positives / false_positives[-1], true_positives / true_positives[-1], thresholds


def roc_auc(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> float:
    """Area under the ROC curve: P(adversarial score > clean score) + P(equal) / 2.

    The trapezoid rule over the full curve, where a tie between classes is a diagonal step worth one
    half; equal to ``sklearn.metrics.roc_auc_score`` and to the Mann-Whitney U statistic / (n_clean n_adv).
    """
    fpr, tpr, _ = roc_curve(clean_scores, adversarial_scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def tpr_at_fpr(clean_scores: np.ndarray, adversarial_scores: np.ndarray, fpr: float) -> float:
    """TPR of the ROC curve at false-positive rate ``fpr`` in [0, 1], linear between consecutive points.

    The curve is the polyline through ``roc_curve``'s points; where it rises vertically at ``fpr`` the
    top of that segment counts: the best detection rate a threshold reaches without exceeding ``fpr``.
    With distinct scores the curve is a staircase, so this is the best deterministic threshold; a tie
    between classes is a diagonal, the rate of choosing at random on the tied scores. The same as
    ``np.interp(fpr, *sklearn_roc[:2])`` wherever ``fpr`` is not the FPR of two curve points.
    """
    if (
        isinstance(fpr, bool)
        or not isinstance(fpr, (int, float, np.integer, np.floating))
        or not 0.0 <= float(fpr) <= 1.0  # NaN fails this too
    ):
        raise ValueError(f"fpr must be a number in [0, 1]; got {fpr!r}")
    curve_fpr, curve_tpr, _ = roc_curve(clean_scores, adversarial_scores)
    last = int(np.searchsorted(curve_fpr, fpr, side="right")) - 1  # the top point at or left of fpr
    if curve_fpr[last] == fpr:
        return float(curve_tpr[last])
    slope = (curve_tpr[last + 1] - curve_tpr[last]) / (curve_fpr[last + 1] - curve_fpr[last])
    return float(curve_tpr[last] + slope * (float(fpr) - curve_fpr[last]))


def equal_error_accuracy(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> tuple[float, float]:
    """(accuracy, threshold) at the equal-error point, where FPR = FNR (Carrara Table 2, "EER accuracy").

    With finitely many scores FPR = FNR may not be reachable: the threshold (flag = score >= threshold,
    an observed score) minimizes |FPR - FNR|, ties going to the lower max(FPR, FNR), then to the higher
    threshold. Accuracy = 1 - (FPR + FNR) / 2, the balanced accuracy, so class sizes do not weigh in.
    The +inf point of the ROC (nothing flagged) is left out: it never beats flagging everything.
    plugins.calibration.equal_error_threshold is not reused: it flags score > threshold, cannot flag
    every sample, and breaks ties toward the lowest threshold.
    """
    false_positives, true_positives, thresholds = _roc_counts(clean_scores, adversarial_scores)
    n_clean, n_adversarial = false_positives[-1], true_positives[-1]
    # Rates scaled by n_clean * n_adversarial are integers: ties in |FPR - FNR| compare exactly.
    scaled_fpr = false_positives[1:] * n_adversarial
    scaled_fnr = (n_adversarial - true_positives[1:]) * n_clean
    # lexsort: the last key is the primary one; it is stable, so full ties keep the higher threshold.
    best = np.lexsort((np.maximum(scaled_fpr, scaled_fnr), np.abs(scaled_fpr - scaled_fnr)))[0]
    error_sum = false_positives[best + 1] / n_clean + 1.0 - true_positives[best + 1] / n_adversarial
    return float(1.0 - error_sum / 2.0), float(thresholds[best + 1])


def operating_point(clean_flags: np.ndarray, adversarial_flags: np.ndarray) -> tuple[float, float]:
    """(fpr, tpr) of a detector's own boolean decisions: its calibrated threshold, I-defender's ID-95/99."""
    clean = _flags(clean_flags, "clean_flags")
    adversarial = _flags(adversarial_flags, "adversarial_flags")
    return float(clean.mean()), float(adversarial.mean())


# --------------------------------------------------------------------------------------------------
# Summaries for the report tables (thesis Table 5.1, Amirian Table 1); None where JSON would need NaN.


def norm_summary(values: np.ndarray) -> dict[str, float | int | None]:
    """n, mean, median and quartiles (numpy's linear quantiles) of per-sample norms; None when empty."""
    norms = _finite_scores(values, "values", allow_empty=True)
    if norms.size == 0:
        return {"n": 0, "mean": None, "median": None, "q25": None, "q75": None}
    q25, median, q75 = np.quantile(norms, [0.25, 0.5, 0.75])
    return {
        "n": int(norms.size),
        "mean": float(norms.mean()),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
    }


def successes_needed(n_correct: int, asr: float) -> int:
    """How many successes make up ``asr`` of ``n_correct`` samples: ceil(asr * n_correct), float-safe."""
    return math.ceil(float(asr) * int(n_correct) - 1e-9)  # 1e-9: asr = 3/7 of 7 needs 3, not 4


def cheapest_share_mean(norms_of_successes: np.ndarray, n_correct: int, asr: float) -> float | None:
    """Mean of the ceil(asr * n_correct) smallest norms among the successes (thesis Table 5.1, equal ASR).

    Attacks reach different success rates, and a higher rate buys its extra successes with larger
    perturbations; comparing mean norms over all successes would favour the weaker attack. Here every
    attack is compared at the same success rate ``asr`` over the ``n_correct`` initially correct samples,
    each by its cheapest successes. Exact for minimization attacks (a sample's norm is what that sample
    needs); a close proxy for early-stopping iterative ones. None when asr is 0 or successes are too few.
    """
    norms = _finite_scores(norms_of_successes, "norms_of_successes", allow_empty=True)
    if isinstance(n_correct, bool) or not isinstance(n_correct, (int, np.integer)) or n_correct < 0:
        raise ValueError(f"n_correct must be a non-negative integer; got {n_correct!r}")
    if (
        isinstance(asr, bool)
        or not isinstance(asr, (int, float, np.integer, np.floating))
        or not 0.0 <= float(asr) <= 1.0
    ):
        raise ValueError(f"asr must be a number in [0, 1]; got {asr!r}")
    needed = successes_needed(n_correct, asr)
    if needed <= 0 or needed > norms.size:
        return None
    return float(np.sort(norms)[:needed].mean())


def mean_confidence(
    probabilities: np.ndarray, y: np.ndarray, adversarial_prediction: np.ndarray, successful: np.ndarray
) -> dict[str, float | None]:
    """Mean softmax probability of the true and of the predicted class on successful adversarial inputs.

    Amirian Table 1: how sure the model is of the wrong class an attack pushed it to, and how much belief
    in the true class is left; ASR alone does not tell these apart. ``probabilities`` (N, K): softmax rows for
    the adversarial examples; y, adversarial_prediction (N,) class indices; successful (N,) boolean.
    Keys "true_class" and "adversarial_class"; both None when no sample succeeded.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.dtype.kind not in "iuf":
        raise ValueError(
            "probabilities must be real numbers of shape (N, K); "
            f"got {probabilities.dtype} {probabilities.shape}"
        )
    probabilities = probabilities.astype(np.float64)
    n_samples, n_classes = probabilities.shape
    if not np.all((probabilities >= 0.0) & (probabilities <= 1.0)) or not np.allclose(
        probabilities.sum(1), 1.0, rtol=0.0, atol=1e-4
    ):
        raise ValueError("probabilities must be softmax rows: in [0, 1], each row summing to 1 (not logits)")
    y = _class_indices(y, "y", n_samples, n_classes)
    adversarial_prediction = _class_indices(
        adversarial_prediction, "adversarial_prediction", n_samples, n_classes
    )
    successful = _flags(successful, "successful", allow_empty=True)
    if successful.size != n_samples:
        raise ValueError(
            f"successful must have one entry per row of probabilities ({n_samples}); got {successful.size}"
        )
    if not successful.any():
        return {"true_class": None, "adversarial_class": None}
    rows = np.flatnonzero(successful)
    return {
        "true_class": float(probabilities[rows, y[rows]].mean()),
        "adversarial_class": float(probabilities[rows, adversarial_prediction[rows]].mean()),
    }


def _roc_counts(
    clean_scores: np.ndarray, adversarial_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flagged clean and adversarial counts (int64) at +inf, then at each distinct score descending."""
    clean = np.sort(_finite_scores(clean_scores, "clean_scores"))
    adversarial = np.sort(_finite_scores(adversarial_scores, "adversarial_scores"))
    thresholds = np.unique(np.concatenate([clean, adversarial]))[::-1]
    false_positives = clean.size - np.searchsorted(clean, thresholds, side="left")
    true_positives = adversarial.size - np.searchsorted(adversarial, thresholds, side="left")
    return (
        np.concatenate([[0], false_positives]).astype(np.int64),
        np.concatenate([[0], true_positives]).astype(np.int64),
        np.concatenate([[np.inf], thresholds]),
    )


def _finite_scores(values: np.ndarray, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``values`` as a 1-D float64 copy, or a ValueError naming ``name``."""
    array = np.asarray(values)
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a 1-D array of real numbers; got {array.dtype} {array.shape}")
    if array.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; needs at least one score")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or Inf")
    return array.astype(np.float64)


def _flags(values: np.ndarray, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``values`` as a 1-D boolean array, or a ValueError naming ``name``."""
    array = np.asarray(values)
    if array.ndim != 1 or array.dtype != np.bool_:
        raise ValueError(f"{name} must be a 1-D boolean array; got {array.dtype} {array.shape}")
    if array.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; needs at least one decision")
    return array


def _class_indices(values: np.ndarray, name: str, n_samples: int, n_classes: int) -> np.ndarray:
    """``values`` as (n_samples,) integers in [0, n_classes), or a ValueError naming ``name``."""
    array = np.asarray(values)
    if array.shape != (n_samples,) or array.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be ({n_samples},) integer class indices; got {array.dtype} {array.shape}"
        )
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}); got values from {array.min()} to {array.max()}"
        )
    return array
