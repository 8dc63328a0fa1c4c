"""Detectors of adversarial inputs from what the network does inside (seeds 000, 002, 003; LRP signatures).

Each keeps the one :class:`~xaiadv.plugins.detectors.base.Detector` contract: fitted on clean data only
(``fit(x, y) -> self``, fitted attributes end in ``_``), ``score(x)`` one number per sample, higher meaning
more likely adversarial, ``calibrate`` the threshold on clean data as a separate step
(:mod:`xaiadv.plugins.calibration`), ``detect(x)``, ``get_state()`` / ``from_state(...)``.
"""

from .base import Decision, Detector
from .entropy import SpatialEntropy
from .idefender import IDefender, gmm_log_likelihood
from .knn import KNNScore
from .lrp_signature import LRPSignature

#: Every detector of the plugins, by name (the shared contract test runs over each).
DETECTORS: dict[str, type[Detector]] = {
    cls.__name__: cls for cls in (SpatialEntropy, IDefender, KNNScore, LRPSignature)
}

__all__ = [
    "DETECTORS",
    "Decision",
    "Detector",
    "IDefender",
    "KNNScore",
    "LRPSignature",
    "SpatialEntropy",
    "gmm_log_likelihood",
]
