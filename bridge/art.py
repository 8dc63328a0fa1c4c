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

from ._common import ATTACK_CLASSES, attack_params, build_config, concat_results, require, run_plugin

require("art", "art")
from art.attacks.attack import EvasionAttack  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from xaiadv.plugins.attacks import AttackConfig, AttackResult  # noqa: E402
from xaiadv.plugins.checks import check_inputs, check_labels  # noqa: E402

from ._art_classifier import classifier_bounds, classifier_preprocessing  # noqa: E402

__all__ = ["LRPFlip", "LRPGrad", "LRPGradMean", "LRPMean"]


class _ARTLRPAttack(EvasionAttack):
    """Shared body of the ART adapters; each subclass names only its plugin pattern."""

    pattern: ClassVar[str]
    _estimator_requirements = (PyTorchClassifier,)

    def __init__(
        self, classifier: PyTorchClassifier, *, batch_size: int = 128, verbose: bool = False, **params: Any
    ) -> None:
        super().__init__(estimator=classifier)
        defaults = attack_params(self.pattern)
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise TypeError(
                f"unknown parameter(s) {unknown} for {type(self).__name__}; valid: {sorted(defaults)}"
            )
        for key, value in {**defaults, **params}.items():
            setattr(self, key, value)
        self.batch_size = batch_size
        self.verbose = verbose
        self.last_result: AttackResult | None = None
        self._check_params()

    def _check_params(self) -> None:
        """One validator: the plugin config checks the attack parameters, this the adapter's own."""
        super()._check_params()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be an int > 0; got {self.batch_size!r}")
        if not isinstance(self.verbose, bool):
            raise ValueError(f"verbose must be a bool; got {self.verbose!r}")
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
        bounds = classifier_bounds(classifier)
        x_tensor, y_tensor = self._checked_inputs(x, y, bounds)
        preprocessing = classifier_preprocessing(classifier, x)
        results = []
        starts = range(0, x_tensor.shape[0], self.batch_size)
        for start in tqdm(starts, desc=type(self).__name__, disable=not self.verbose):
            stop = start + self.batch_size
            results.append(
                run_plugin(
                    self.pattern,
                    classifier.model,
                    x_tensor[start:stop],
                    None if y_tensor is None else y_tensor[start:stop],
                    bounds=bounds,
                    preprocessing=preprocessing,
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


def _params(pattern: str) -> list[str]:
    return [*EvasionAttack.attack_params, *attack_params(pattern), "batch_size", "verbose"]


class LRPFlip(_ARTLRPAttack):
    """LRP-flip / batch-flip (thesis Algorithms 3-5) as an ART evasion attack; untargeted.

    Parameters: n_batch, max_iter, early_stop, composite, relevance_every, flip_back, trace, canonizers,
    batch_size, verbose.
    """

    pattern = ATTACK_CLASSES["LRPFlip"]
    attack_params = _params(pattern)


class LRPMean(_ARTLRPAttack):
    """LRP-mean (thesis Algorithm 6) as an ART evasion attack; untargeted.

    Parameters: eps, n_batch, max_iter, early_stop, composite, relevance_every, trace, canonizers, batch_size,
    verbose.
    """

    pattern = ATTACK_CLASSES["LRPMean"]
    attack_params = _params(pattern)


class LRPGrad(_ARTLRPAttack):
    """LRP-grad (thesis Algorithm 7) as an ART evasion attack; targeted or not.

    Parameters: eps, n_batch, max_iter, early_stop, composite, targeted, relevance_every, momentum, trace,
    canonizers, batch_size, verbose. With n_batch=1.0 (all values) it is ART's BasicIterativeMethod without
    projection.
    """

    pattern = ATTACK_CLASSES["LRPGrad"]
    attack_params = _params(pattern)


class LRPGradMean(_ARTLRPAttack):
    """LRP-grad+mean (thesis 5.2.1) as an ART evasion attack: LRP-mean where a sample's gradient vanishes.

    Parameters: as LRPGrad.
    """

    pattern = ATTACK_CLASSES["LRPGradMean"]
    attack_params = _params(pattern)


# The ART detectors live in their own module; users import them from here, as the design names them.
from .art_detectors import IDefender, KNNDetector, SpatialEntropyDetector  # noqa: E402

__all__ += ["IDefender", "KNNDetector", "SpatialEntropyDetector"]
