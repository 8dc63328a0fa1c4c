"""Attack metrics: success rate (thesis eq. 4.15) and perturbation norms (eqs. 2.26-2.28)."""

from __future__ import annotations

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
