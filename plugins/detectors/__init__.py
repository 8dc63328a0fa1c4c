"""Detectors of adversarial inputs from what the network does inside (seeds 000, 002, 003).

Each is fitted on clean data only (``fit(...) -> self``, fitted attributes end in ``_``) and
``score(x)`` returns one number per sample, higher meaning more likely adversarial; threshold
calibration is a separate step (:mod:`xaiadv.plugins.calibration`).
"""

from .entropy import SpatialEntropy
from .idefender import IDefender, gmm_log_likelihood
from .knn import KNNScore

__all__ = ["IDefender", "KNNScore", "SpatialEntropy", "gmm_log_likelihood"]
