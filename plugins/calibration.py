"""Threshold calibration shared by the detectors: scores are higher for more likely adversarial inputs.

A sample is flagged when its score is strictly above the threshold. At a target false-positive rate the
threshold is the smallest clean score that leaves at most floor(fpr * n) of the n clean calibration scores
above it, so the rate on the calibration data never exceeds ``fpr`` and misses it by less than 1/n.
Per class: the same within each class's clean scores. With adversarial scores, the equal-error
threshold instead (where the false-positive and false-negative rates meet).

Ties: a score with few distinct values (the kNN score of k neighbours is a multiple of 1/k) piles clean
samples onto one value, and when the fpr quantile falls inside such a pile ``score > threshold`` flags far
fewer than fpr of clean data: none at all when the pile sits at the largest score. A second, continuous
score breaks those ties (:func:`tie_broken_threshold_at_fpr`, :func:`flag_tie_broken`).

Held out: a detector whose threshold is set on the images it was fitted on is biased (I-defender's
mixtures over-fit their own data, see :mod:`~xaiadv.plugins.detectors.idefender`), so the clean data is
split once, seeded and per class, by :func:`held_out_split`; :func:`thresholds_at_fpr` is the one entry point
the detectors use (global or per class, with or without a tie-break).
"""

from __future__ import annotations

import math

import numpy as np

from . import checks

#: A threshold: one float, or one per class ((n_classes,) float64).
Threshold = float | np.ndarray


def check_fpr(fpr: object) -> float:
    """``fpr`` as a float in the open interval (0, 1), or a ValueError naming it."""
    return checks.open_fraction("fpr", fpr)


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """The threshold that flags at most ``fpr`` of ``clean_scores`` (flag: score > threshold)."""
    fpr = check_fpr(fpr)
    scores = np.sort(_scores(clean_scores, "clean_scores"))
    allowed_above = math.floor(fpr * scores.size + 1e-9)
    return float(scores[scores.size - allowed_above - 1])


def tie_broken_threshold_at_fpr(
    clean_scores: np.ndarray, clean_tie_breaks: np.ndarray, fpr: float
) -> tuple[float, float]:
    """(threshold, tie-break threshold) flagging at most ``fpr`` of the clean (score, tie-break) pairs.

    Pairs are ordered lexicographically, score first: a sample is flagged when its score is above the
    threshold, or equal to it with a tie-break above the tie-break threshold (:func:`flag_tie_broken`).
    The pair is the clean pair that leaves floor(fpr * n) pairs above it, so the threshold itself equals
    :func:`threshold_at_fpr` of the scores alone; only the samples tied with it are split, by tie-break.
    """
    fpr = check_fpr(fpr)
    scores = _scores(clean_scores, "clean_scores")
    tie_breaks = _scores(clean_tie_breaks, "clean_tie_breaks")
    if tie_breaks.shape != scores.shape:
        raise ValueError(
            f"clean_tie_breaks must have one entry per score ({scores.size}); got {tie_breaks.size}"
        )
    order = np.lexsort((tie_breaks, scores))
    pick = order[scores.size - math.floor(fpr * scores.size + 1e-9) - 1]
    return float(scores[pick]), float(tie_breaks[pick])


def flag_tie_broken(
    scores: np.ndarray, tie_breaks: np.ndarray, threshold: float, tie_break_threshold: float
) -> np.ndarray:
    """(N,) bool: score > threshold, or score == threshold and tie-break > tie-break threshold."""
    scores, tie_breaks = np.asarray(scores), np.asarray(tie_breaks)
    return (scores > threshold) | ((scores == threshold) & (tie_breaks > tie_break_threshold))


def per_class_thresholds(
    clean_scores: np.ndarray, classes: np.ndarray, n_classes: int, fpr: float
) -> np.ndarray:
    """One threshold per class from that class's clean scores; a class without scores raises, naming it."""
    scores = _scores(clean_scores, "clean_scores")
    classes = np.asarray(classes).reshape(-1)
    if classes.shape != scores.shape:
        raise ValueError(f"classes must have one entry per score ({scores.size}); got {classes.size}")
    thresholds = np.empty(n_classes, dtype=np.float64)
    for label in range(n_classes):  # one quantile per class: n_classes is small, not a per-sample loop
        members = scores[classes == label]
        if members.size == 0:
            raise ValueError(
                f"class {label} has no clean calibration samples; a per-class threshold needs some"
            )
        thresholds[label] = threshold_at_fpr(members, fpr)
    return thresholds


def thresholds_at_fpr(
    clean_scores: np.ndarray,
    fpr: float,
    *,
    tie_breaks: np.ndarray | None = None,
    classes: np.ndarray | None = None,
    n_classes: int | None = None,
) -> tuple[Threshold, Threshold | None]:
    """(threshold, tie-break threshold or None) flagging at most ``fpr`` of the clean scores.

    Global (``classes`` None): :func:`threshold_at_fpr`, or :func:`tie_broken_threshold_at_fpr` with
    ``tie_breaks``. Per class: the same within each class's scores, giving (n_classes,) arrays; a class
    without scores raises, naming it (as :func:`per_class_thresholds`, which it equals without tie-breaks).
    """
    fpr = check_fpr(fpr)
    if classes is None:
        if tie_breaks is None:
            return threshold_at_fpr(clean_scores, fpr), None
        return tie_broken_threshold_at_fpr(clean_scores, tie_breaks, fpr)
    n_classes = checks.positive_int("n_classes", n_classes)
    if tie_breaks is None:
        return per_class_thresholds(clean_scores, classes, n_classes, fpr), None
    scores, ties = _scores(clean_scores, "clean_scores"), _scores(tie_breaks, "clean_tie_breaks")
    classes = np.asarray(classes).reshape(-1)
    if not classes.shape == ties.shape == scores.shape:
        raise ValueError(f"classes and tie_breaks must have one entry per score ({scores.size})")
    pairs = []
    for label in range(n_classes):  # one quantile per class: n_classes is small, not a per-sample loop
        members = classes == label
        if not members.any():
            raise ValueError(
                f"class {label} has no clean calibration samples; a per-class threshold needs some"
            )
        pairs.append(tie_broken_threshold_at_fpr(scores[members], ties[members], fpr))
    threshold, tie_threshold = (np.array(values, dtype=np.float64) for values in zip(*pairs, strict=True))
    return threshold, tie_threshold


def held_out_split(labels: np.ndarray, share: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitting rows, calibration rows), each sorted: ``round(share * count)`` of each class held out.

    Seeded: one shuffle by ``np.random.default_rng(random_state)``, then per class the first ranks of the
    shuffled order are held out, so the classes keep their proportions in both parts. Refused when either
    part would be empty.
    """
    share = checks.open_fraction("calibration_share", share)
    random_state = checks.integer("random_state", random_state)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = labels.size
    counts = np.bincount(labels) if n else np.zeros(0, dtype=np.int64)
    held = np.round(share * counts).astype(int)
    order = np.random.default_rng(random_state).permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]  # shuffled within each class
    rank = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    is_calibration = rank < np.repeat(held, counts)
    if not is_calibration.any() or is_calibration.all():
        raise ValueError(
            f"calibration_share={share} of {n} samples leaves no "
            f"{'calibration' if not is_calibration.any() else 'fitting'} samples; give more clean data"
        )
    return np.sort(order[~is_calibration]), np.sort(order[is_calibration])


def equal_error_threshold(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> tuple[float, float]:
    """(threshold, equal error rate): the observed score where FPR and FNR are closest; EER their mean.

    Candidates are all observed scores; ties are handled by the strict ``>`` rule, so tied clean and
    adversarial scores fall on the same side.
    """
    clean = _scores(clean_scores, "clean_scores")
    adversarial = _scores(adversarial_scores, "adversarial_scores")
    candidates = np.unique(np.concatenate([clean, adversarial]))
    clean_sorted, adversarial_sorted = np.sort(clean), np.sort(adversarial)
    fpr = 1.0 - np.searchsorted(clean_sorted, candidates, side="right") / clean.size
    fnr = np.searchsorted(adversarial_sorted, candidates, side="right") / adversarial.size
    best = int(np.argmin(np.abs(fpr - fnr)))
    return float(candidates[best]), float((fpr[best] + fnr[best]) / 2.0)


def _scores(values: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError(f"{name} is empty; calibration needs scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contains NaN or Inf")
    return scores
