"""``DetectorAwarePGD``: the detector-aware attack of :mod:`xaiadv.plugins.adaptive` as an ART EvasionAttack.

``DetectorAwarePGD(classifier, detector, norm=np.inf, eps=0.3, eps_step=0.01, max_iter=100,
batch_size=128).generate(x, y)`` crafts examples that the classifier misclassifies and the detector accepts
at its own threshold. ``detector`` is a fitted detector with a differentiable score: one of ours (the ART
detector or the plugin it wraps) or a user's object with ``score_torch(x)`` and ``threshold_``. It must
score the classifier's own model, or the figure it gives is a transfer figure: it is refused otherwise.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ._common import require

require("art", "art")
from art.attacks.attack import EvasionAttack  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from xaiadv.plugins import checks  # noqa: E402
from xaiadv.plugins.adaptive import AdaptiveConfig, DifferentiableDetector, detector_aware_pgd  # noqa: E402
from xaiadv.plugins.checks import check_labels  # noqa: E402

from ._art_classifier import classifier_of  # noqa: E402

__all__ = ["DetectorAwarePGD"]


class DetectorAwarePGD(EvasionAttack):
    """PGD that misclassifies and stays under a detector's threshold (C&W 2017; seed 002 eq. 6).

    Parameters: detector, norm (np.inf or 2), eps, eps_step, max_iter, search_steps (weights tried per
    sample), kappa, delta (see :class:`~xaiadv.plugins.adaptive.AdaptiveConfig`), batch_size, verbose.
    After ``generate``, ``last_bypassed`` / ``last_flagged`` hold the per-sample outcome.
    """

    attack_params: ClassVar[list[str]] = [
        *EvasionAttack.attack_params,
        "detector",
        "norm",
        "eps",
        "eps_step",
        "max_iter",
        "search_steps",
        "kappa",
        "delta",
        "batch_size",
        "verbose",
    ]
    _estimator_requirements = (PyTorchClassifier,)

    def __init__(
        self,
        classifier: PyTorchClassifier,
        detector: Any,
        *,
        norm: float = np.inf,
        eps: float = 0.3,
        eps_step: float = 0.01,
        max_iter: int = 100,
        search_steps: int = 5,
        kappa: float = 0.0,
        delta: float = 0.0,
        batch_size: int = 128,
        verbose: bool = False,
    ) -> None:
        super().__init__(estimator=classifier)
        self.detector = detector
        self.norm, self.eps, self.eps_step, self.max_iter = norm, eps, eps_step, max_iter
        self.search_steps, self.kappa, self.delta = search_steps, kappa, delta
        self.batch_size, self.verbose = batch_size, verbose
        self.last_bypassed: np.ndarray | None = None
        self.last_flagged: np.ndarray | None = None
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        checks.positive_int("batch_size", self.batch_size)
        checks.boolean("verbose", self.verbose)
        self._config = AdaptiveConfig(
            norm=float(self.norm),
            eps=self.eps,
            eps_step=self.eps_step,
            max_iter=self.max_iter,
            search_steps=self.search_steps,
            kappa=self.kappa,
            delta=self.delta,
        )
        self._scorer = differentiable_detector(self.detector)
        check_same_model(self._scorer, self.estimator.model)

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
        """Adversarial examples of x (same shape and dtype); y: true labels (indices or one-hot), None =
        the classifier's predictions."""
        if kwargs:
            raise TypeError(f"generate() got unexpected keyword argument(s) {sorted(kwargs)}")
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy array; got {type(x).__name__}")
        classifier = self.estimator
        model = classifier_of(classifier, x)
        x_tensor = torch.as_tensor(x, device=classifier.device)
        if y is None:
            labels = torch.as_tensor(classifier.predict(x, batch_size=self.batch_size).argmax(1))
        else:
            labels = check_labels(y, len(x), classifier.nb_classes, torch.device("cpu"))
        labels = labels.to(classifier.device)
        outputs, bypassed, flagged = [], [], []
        starts = range(0, len(x), self.batch_size)
        for start in tqdm(starts, desc="DetectorAwarePGD", disable=not self.verbose):
            stop = start + self.batch_size
            result = detector_aware_pgd(
                model, self._scorer, x_tensor[start:stop], labels[start:stop], config=self._config
            )
            outputs.append(result.x_adv.cpu().numpy())
            bypassed.append(result.bypassed.cpu().numpy())
            flagged.append(result.flagged.cpu().numpy())
        if not outputs:
            return x.copy()
        self.last_bypassed, self.last_flagged = np.concatenate(bypassed), np.concatenate(flagged)
        return np.concatenate(outputs).astype(x.dtype, copy=False)


def differentiable_detector(detector: object) -> DifferentiableDetector:
    """The object with ``score_torch`` and ``threshold_``: the detector itself, or the plugin an ART
    detector of ours wraps (``plugin_``); refused with what is missing otherwise, also when its score has
    no gradient (``score_torch`` raises NotImplementedError on a probe, as spatial entropy's does)."""
    for candidate in (detector, getattr(detector, "plugin_", None)):
        if isinstance(candidate, DifferentiableDetector) and _fitted_threshold(candidate):
            _check_differentiable(candidate)
            return candidate
    raise TypeError(
        f"detector: a fitted detector with a differentiable score_torch(x) and a threshold_ is needed; got "
        f"{type(detector).__name__} (fit and calibrate it first, or give a detector whose score is "
        "differentiable)"
    )


def _fitted_threshold(detector: DifferentiableDetector) -> bool:
    try:
        threshold = np.asarray(getattr(detector, "threshold_", None), dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return threshold.ndim <= 1 and threshold.size > 0 and bool(np.isfinite(threshold).all())


def _check_differentiable(detector: DifferentiableDetector) -> None:
    shape = getattr(detector, "input_shape_", None)
    if shape is None:
        return  # a user's detector: its first call will say
    model = getattr(detector, "model", None)
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    try:
        detector.score_torch(torch.zeros((1, *shape), device=device))
    except NotImplementedError as error:
        raise TypeError(f"detector: {error}; a detector-aware attack needs a differentiable score") from error


def check_same_model(detector: object, model: torch.nn.Module) -> None:
    """Refuse a detector that reads another model than the classifier's (when it says which it reads)."""
    own = getattr(detector, "classifier", None) or getattr(detector, "model", None)
    own_module = getattr(own, "module", getattr(own, "model", own))
    if isinstance(own_module, torch.nn.Module) and own_module is not model:
        raise ValueError(
            "detector: it was fitted on another model than the classifier's; an adaptive attack must "
            "attack the model the detector protects (use the same torch module)"
        )
