"""What every ART adapter reads from a PyTorchClassifier: its module, bounds and (mean, std) preprocessing,
as one :class:`~xaiadv.plugins.model.Classifier`."""

from __future__ import annotations

import numpy as np

from xaiadv.plugins.model import Classifier

from ._common import require

require("art", "art")
from art.estimators.classification import PyTorchClassifier  # noqa: E402
from art.preprocessing.standardisation_mean_std import (  # noqa: E402
    StandardisationMeanStd,
    StandardisationMeanStdPyTorch,
)
from art.preprocessing.standardisation_mean_std.utils import broadcastable_mean_std  # noqa: E402


def classifier_bounds(classifier: PyTorchClassifier) -> tuple[float, float]:
    """The classifier's clip_values as a float pair; LRP attacks need them (flip midpoint, default eps)."""
    clip_values = classifier.clip_values
    if clip_values is None:
        raise ValueError("LRP attacks need the classifier's clip_values (the input bounds); got None")
    low, high = np.asarray(clip_values, dtype=np.float64).reshape(2, -1)
    if low.size != 1 or high.size != 1:
        raise ValueError("LRP attacks need scalar clip_values (low, high); got per-feature bounds")
    return float(low[0]), float(high[0])


def classifier_preprocessing(
    classifier: PyTorchClassifier, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The classifier's (mean, std) broadcastable against x, as ART itself would broadcast them.

    Other preprocessing (defences) is refused: the attack would not see what the classifier sees.
    """
    operations = list(classifier.preprocessing_operations)
    standardisations = (StandardisationMeanStd, StandardisationMeanStdPyTorch)
    others = [op for op in operations if not isinstance(op, standardisations)]
    if others:
        raise ValueError(
            f"LRP attacks support only (mean, std) preprocessing; the classifier also has {others}"
        )
    if not operations:
        return None
    mean, std = (
        np.asarray(value, dtype=np.float64)
        for value in broadcastable_mean_std(x, np.asarray(operations[0].mean), np.asarray(operations[0].std))
    )
    # Leading ones up to x's rank, so the plugin broadcasts exactly as ART does: ART aligns a vector as long
    # as the last axis with that axis (even when it is also as long as the channel axis).
    lead = (1,) * (np.ndim(x) - mean.ndim)
    return mean.reshape(lead + mean.shape), std.reshape(lead + std.shape)


def classifier_of(classifier: PyTorchClassifier, x: np.ndarray) -> Classifier:
    """The plugins' Classifier of an ART PyTorchClassifier, its preprocessing broadcast as ART does on x."""
    return Classifier(
        classifier.model, classifier_bounds(classifier), classifier_preprocessing(classifier, x)
    )
