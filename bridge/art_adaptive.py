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
from xaiadv.plugins.adaptive import (  # noqa: E402
    AdaptiveConfig,
    check_same_model,
    detector_aware_pgd,
    differentiable_detector,
)
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
