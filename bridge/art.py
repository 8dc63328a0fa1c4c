"""The LRP attacks as ART evasion attacks: ``LRPGrad(classifier).generate(x, y)``.

They take an ART ``PyTorchClassifier``, honour its ``clip_values`` (the bounds) and its
``preprocessing=(mean, std)`` (gradients w.r.t. the raw input, relevance computed in the model's own
input space and mapped back element-wise), and work inside ART's harnesses such as ``AdversarialTrainer``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ._common import attack_classes, attack_params, build_config, concat_results, require, run_plugin

require("art", "art")
from art.attacks.attack import EvasionAttack  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from xaiadv.plugins import checks  # noqa: E402
from xaiadv.plugins.attacks import AttackConfig, AttackResult  # noqa: E402
from xaiadv.plugins.checks import check_inputs, check_labels  # noqa: E402

from ._art_classifier import classifier_bounds, classifier_of  # noqa: E402

__all__ = ["LRPFlip", "LRPGrad", "LRPGradMean", "LRPMean"]


class _ARTLRPAttack(EvasionAttack):
    """Shared body of the ART adapters; each subclass names only its plugin pattern."""

    pattern: ClassVar[str]
    _estimator_requirements = (PyTorchClassifier,)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """ART's ``attack_params`` of each attack class: ART's own, the pattern's, batch_size, verbose."""
        super().__init_subclass__(**kwargs)
        cls.attack_params = [
            *EvasionAttack.attack_params,
            *attack_params(cls.pattern),
            "batch_size",
            "verbose",
        ]

    def __init__(
        self, classifier: PyTorchClassifier, *, batch_size: int = 128, verbose: bool = False, **params: Any
    ) -> None:
        super().__init__(estimator=classifier)
        defaults = attack_params(self.pattern)
        checks.unknown_keys(type(self).__name__, params, list(defaults))
        for key, value in {**defaults, **params}.items():
            setattr(self, key, value)
        self.batch_size = batch_size
        self.verbose = verbose
        self.last_result: AttackResult | None = None
        self._check_params()

    def _check_params(self) -> None:
        """One validator: the plugin config checks the attack parameters, this the adapter's own."""
        super()._check_params()
        checks.positive_int("batch_size", self.batch_size)
        checks.boolean("verbose", self.verbose)
        classifier_bounds(self.estimator)
        self._config: AttackConfig = build_config(self.pattern, self._plugin_params())

    def set_params(self, **kwargs: Any) -> None:
        """ART's set_params, all or nothing: when a value is refused, every parameter keeps its old value."""
        before = {key: getattr(self, key) for key in self.attack_params if hasattr(self, key)}
        try:
            super().set_params(**kwargs)
        except Exception:
            for key, value in before.items():
                setattr(self, key, value)
            raise

    def _plugin_params(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in attack_params(self.pattern)}

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
        """Adversarial examples for x (same shape and dtype); y are true labels, or targets when targeted.

        Labels may be class indices or one-hot; None means the classifier's predictions (untargeted only).
        After the call, ``last_result`` holds success, iterations and the optional trace per sample.
        """
        if kwargs:
            raise TypeError(f"generate() got unexpected keyword argument(s) {sorted(kwargs)}")
        classifier = self.estimator
        x_tensor, y_tensor = self._checked_inputs(x, y, classifier_bounds(classifier))
        model = classifier_of(classifier, x)
        results = []
        starts = range(0, x_tensor.shape[0], self.batch_size)
        for start in tqdm(starts, desc=type(self).__name__, disable=not self.verbose):
            stop = start + self.batch_size
            results.append(
                run_plugin(
                    self.pattern,
                    model,
                    x_tensor[start:stop],
                    None if y_tensor is None else y_tensor[start:stop],
                    config=self._config,
                )
            )
        self.last_result = concat_results(results, x_tensor)
        return self.last_result.x_adv.cpu().numpy().astype(x.dtype, copy=False)

    def _checked_inputs(
        self, x: object, y: object, bounds: tuple[float, float]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x and y (class indices) as tensors on the classifier's device, all of them checked before the
        first mini-batch runs: values, the classifier's input shape, and labels against its class count."""
        classifier = self.estimator
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy array; got {type(x).__name__}")
        x_tensor = check_inputs(torch.as_tensor(x), bounds)
        if tuple(x_tensor.shape[1:]) != tuple(classifier.input_shape):
            expected = ", ".join(map(str, classifier.input_shape))
            raise ValueError(f"x must be shaped (N, {expected}) as the classifier's input; got {x.shape}")
        if y is None:
            if self.targeted:
                raise ValueError("targeted attacks need y: the target class of each sample")
            return x_tensor.to(classifier.device), None
        labels = check_labels(y, x_tensor.shape[0], classifier.nb_classes, classifier.device)
        return x_tensor.to(classifier.device), labels


LRPFlip, LRPMean, LRPGrad, LRPGradMean = attack_classes(
    _ARTLRPAttack, "an ART evasion attack", own=("batch_size", "verbose")
)


# The detector-aware attack and the ART detectors live in their own modules; users import them from here.
from .art_adaptive import DetectorAwarePGD  # noqa: E402

__all__ += ["DetectorAwarePGD"]

from .art_detectors import (  # noqa: E402
    IDefenderDetector,
    KNNDetector,
    LRPSignatureDetector,
    SpatialEntropyDetector,
)

__all__ += ["IDefenderDetector", "KNNDetector", "LRPSignatureDetector", "SpatialEntropyDetector"]
