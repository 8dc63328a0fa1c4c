"""The four detectors as ART evasion detectors: ``KNNDetector(classifier).fit(x, y)``, then ``detect(x)``.

An adapter maps ART's calling convention onto its plugin (:mod:`xaiadv.plugins.detectors`), which does the
work under the one Detector contract: the ``PyTorchClassifier`` becomes a
:class:`~xaiadv.plugins.model.Classifier` (its module, read by layer name, never ART's integer
``get_activations``; its ``preprocessing=(mean, std)``), numpy arrays become tensors and back. ``fit`` is
the plugin's ``fit_calibrated``: fitted on all but a seeded per-class share ``calibration_share`` of the
clean data (or on all of it, with ``x_calibration``), the threshold set on the rest at ``fpr``.
``set_params(fpr=...)`` on a fitted detector re-calibrates from the kept clean scores, without a refit.
``save``/``load``: the plugin's ``get_state``/``from_state`` in the safetensors + JSON manifest format of
:mod:`xaiadv.plugins.storage` (version-2 saves are read too), never pickle.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, ClassVar, Self

import numpy as np
import torch

from ._common import require

require("art", "art")
from art.defences.detector.evasion import EvasionDetector  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

from xaiadv.plugins import checks, storage  # noqa: E402
from xaiadv.plugins import detectors as plugin_detectors  # noqa: E402
from xaiadv.plugins.calibration import check_fpr  # noqa: E402
from xaiadv.plugins.detectors.base import Decision, Detector  # noqa: E402
from xaiadv.plugins.model import Classifier  # noqa: E402

from ._art_classifier import classifier_bounds, classifier_preprocessing  # noqa: E402
from .registry import detectors  # noqa: E402

__all__ = ["IDefenderDetector", "KNNDetector", "LRPSignatureDetector", "SpatialEntropyDetector"]


class _ARTDetector(EvasionDetector):
    """Shared body: parameters, conversion, save and load; a subclass names its plugin and its parameters."""

    plugin_class: ClassVar[type[Detector]]
    #: The parameters the adapter exposes with their defaults: the plugin's (its ``config_names``, defaults
    #: read from its constructor: one place for each), the adapter's own, and those of the calibration.
    plugin_params: ClassVar[dict[str, Any]]
    own_params: ClassVar[dict[str, Any]] = {}
    calibration_params: ClassVar[dict[str, Any]] = {"fpr": 0.05, "calibration_share": 0.2, "random_state": 0}
    #: Parameters that only move the threshold: changed on a fitted detector, it is re-calibrated.
    threshold_params: ClassVar[frozenset[str]] = frozenset({"fpr"})
    #: The names this class's saves carry (today's and any former one).
    saved_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        defaults = inspect.signature(cls.plugin_class).parameters
        plugin = {name: defaults[name].default for name in cls.plugin_class.config_names}
        shared = cls.calibration_params  # random_state: the split's seed, and the plugin's where it has one
        cls.plugin_params = {**{k: v for k, v in plugin.items() if k not in shared}, **cls.own_params}
        cls.defence_params = [*cls.plugin_params, *cls.calibration_params]
        cls.saved_names = (cls.__name__, *cls.saved_names)

    def __init__(self, classifier: PyTorchClassifier, **params: Any) -> None:
        super().__init__()
        if not isinstance(classifier, PyTorchClassifier):
            raise TypeError(
                f"{type(self).__name__} needs an ART PyTorchClassifier (it reads the torch module by layer "
                f"name); got {type(classifier).__name__}"
            )
        defaults = {**self.plugin_params, **self.calibration_params}
        checks.unknown_keys(type(self).__name__, params, list(defaults))
        self.classifier = classifier
        for key, value in {**defaults, **params}.items():
            setattr(self, key, value)
        self._check_params()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    @property
    def threshold_(self) -> float | np.ndarray:
        """The fitted plugin's threshold: a float, or one per class (score units)."""
        self._check_fitted()
        return self.plugin_.threshold_

    def _check_params(self) -> None:
        """One validator: the adapter checks its own parameters, a fresh plugin checks the plugin's."""
        check_fpr(self.fpr)
        checks.open_fraction("calibration_share", self.calibration_share)
        checks.integer("random_state", self.random_state)
        self._plugin(batch_size=128)

    def set_params(self, **kwargs: Any) -> None:
        """Set parameters by name, all or nothing: an unknown name or a refused value changes nothing.

        On a fitted detector, changing only :attr:`threshold_params` re-calibrates the threshold from the
        plugin's kept clean calibration scores (the fit, and so every score, is kept); any other changed
        value discards the fit, which belongs to the old configuration.
        """
        unknown = sorted(set(kwargs) - set(self.defence_params))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for {type(self).__name__}; valid: {self.defence_params}"
            )
        before = self.get_params()
        for key, value in kwargs.items():
            setattr(self, key, value)
        try:
            self._check_params()
            changed = sorted(key for key, value in self.get_params().items() if value != before[key])
            if changed and hasattr(self, "plugin_"):
                if set(changed) <= self.threshold_params:
                    self.plugin_.recalibrate(fpr=self._fpr())
                else:
                    del self.plugin_
                    self._discarded = f"set_params changed {changed}, which the fit depends on"
        except Exception:
            for key, value in before.items():
                setattr(self, key, value)
            raise

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 128,
        *,
        x_calibration: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        """Fit on clean ``x`` (N, *input_shape) with true labels ``y`` ((N,) indices or (N, K) one-hot), then
        set the threshold on a held-out share, or on ``x_calibration`` (clean inputs of another split, e.g.
        test images: images the network was trained on can score unlike unseen ones). Fitted: ``plugin_``."""
        if kwargs:
            raise TypeError(f"fit() got unexpected keyword argument(s) {sorted(kwargs)}")
        plugin = self._plugin(checks.positive_int("batch_size", batch_size))
        x_tensor = self._as_tensor(x)
        labels = checks.check_labels(y, x_tensor.shape[0], self.classifier.nb_classes, x_tensor.device)
        held = None if x_calibration is None else self._as_tensor(x_calibration, "x_calibration")
        split = {"calibration_share": self.calibration_share, "random_state": self.random_state}
        self.plugin_ = plugin.fit_calibrated(x_tensor, labels, fpr=self._fpr(), x_calibration=held, **split)
        self.__dict__.pop("_discarded", None)

    def detect(
        self, x: np.ndarray, batch_size: int = 128, **kwargs: Any
    ) -> tuple[dict[str, Any], np.ndarray]:
        """(report, is_adversarial): report["score"] (N,) float64, higher = more likely adversarial, and
        report["threshold"] (a float, or (N,) each sample's class's); is_adversarial (N,) bool."""
        if kwargs:
            raise TypeError(f"detect() got unexpected keyword argument(s) {sorted(kwargs)}")
        self._check_fitted()
        self.plugin_.batch_size = checks.positive_int("batch_size", batch_size)
        decision = self.plugin_.decide(self._as_tensor(x))
        threshold = _numpy(decision.threshold) if self.plugin_.per_class_ else float(self.plugin_.threshold_)
        report = {"score": _numpy(decision.score), "threshold": threshold}
        return self._report(report, decision), _numpy(decision.flags)

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-able dict): the fitted detector in memory, what :meth:`save` writes and
        :meth:`from_state` rebuilds (the dict: the adapter's ``config`` and the plugin's ``state``)."""
        self._check_fitted()
        arrays, state = self.plugin_.get_state()
        return arrays, {"config": self.get_params(), "state": state}

    @classmethod
    def from_state(
        cls, classifier: PyTorchClassifier, arrays: dict[str, np.ndarray], saved: dict[str, Any]
    ) -> Self:
        """The detector :meth:`get_state` gave, for ``classifier`` (the one it was fitted with)."""
        detector = cls(classifier, **saved["config"])
        detector.plugin_ = cls.plugin_class.from_state(
            detector._classifier(), arrays, saved["state"], batch_size=128
        )
        return detector

    def save(self, path: str | os.PathLike[str]) -> None:
        """``<path>.safetensors`` + ``<path>.json`` (a folder: ``detector.*`` in it), atomically."""
        arrays, saved = self.get_state()
        name, module = type(self).__name__, self.classifier.model
        storage.save_detector(
            path, arrays, name=name, config=saved["config"], state=saved["state"], module=module
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], classifier: PyTorchClassifier) -> Self:
        """The detector saved at ``path`` for ``classifier``, the one it was fitted with (hash checked)."""
        if not isinstance(classifier, PyTorchClassifier):
            raise TypeError(f"classifier must be an ART PyTorchClassifier; got {type(classifier).__name__}")
        arrays, record, version = storage.load_detector(path, names=cls.saved_names, module=classifier.model)
        try:
            if version == 2:
                arrays, state = cls(classifier, **record["config"])._version_2(arrays, record)
            else:
                state = record["state"]
            return cls.from_state(classifier, arrays, {"config": record["config"], "state": state})
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{os.fspath(path)} could not be restored ({error}): {storage.REFIT}") from None

    def _version_2(self, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> tuple[dict, dict]:
        """A version-2 save (the adapter's own fitted dict and threshold) as the plugin's ``get_state()``."""
        renamed = {
            "calibration.distance": "calibration.tie_break",
            "calibration.prediction": "calibration.class",
        }
        arrays = {renamed.get(key, key): value for key, value in arrays.items() if key != "thresholds"}
        fitted = {key: value for key, value in record["fitted"].items() if key not in ("config", "keep")}
        calibration = {
            "fpr": self._fpr(),
            "per_class": self.plugin_class.per_class_default,
            "threshold": record["threshold"],
            "tie_break_threshold": fitted.pop("distance_threshold", None),
        }
        state = {"detector": self.plugin_class.__name__, "config": self._plugin(128).get_config()}
        return arrays, {**state, "fitted": fitted, "calibration": calibration}

    def _fpr(self) -> float:
        """The false-positive rate the threshold is set at."""
        return self.fpr

    def _plugin(self, batch_size: int) -> Detector:
        """An unfitted plugin with this adapter's parameters, on the classifier's module and preprocessing."""
        params = {key: getattr(self, key) for key in self.plugin_class.config_names}
        return self.plugin_class(self._classifier(), **params, batch_size=batch_size)

    def _classifier(self) -> Classifier:
        like = np.zeros((1, *self.classifier.input_shape), dtype=np.float32)
        try:
            preprocessing = classifier_preprocessing(self.classifier, like)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error} (detectors need the same)") from None
        bounds = None if self.classifier.clip_values is None else classifier_bounds(self.classifier)
        return Classifier.wrap(self.classifier.model, bounds=bounds, preprocessing=preprocessing)

    def _report(self, report: dict[str, Any], decision: Decision) -> dict[str, Any]:
        return report

    def _as_tensor(self, x: object, name: str = "x") -> torch.Tensor:
        """``x`` (a floating numpy array) as float32 on the classifier's device, shaped as its input."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
            raise TypeError(
                f"{name} must be a floating-point numpy array; got {getattr(x, 'dtype', type(x))}"
            )
        shape = tuple(self.classifier.input_shape)
        if x.shape[1:] != shape or x.ndim != len(shape) + 1:
            raise ValueError(f"{name} must be shaped (N, {', '.join(map(str, shape))}); got {x.shape}")
        tensor = checks.check_batch(torch.as_tensor(x, dtype=torch.float32), name=name)
        return tensor.to(self.classifier.device)

    def _check_fitted(self) -> None:
        if not hasattr(self, "plugin_"):
            reason = getattr(self, "_discarded", None)
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet: call fit(x, y) first"
                + (f" ({reason})" if reason else "")
            )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


@detectors.register("xaiadv:SpatialEntropyDetector")
class SpatialEntropyDetector(_ARTDetector):
    """Amirian et al. 2018 (seeds/000, eqs. 3-4), :class:`~xaiadv.plugins.detectors.SpatialEntropy`: mean
    local spatial entropy of the guided-backprop feature response; one global threshold at ``fpr``."""

    plugin_class = plugin_detectors.SpatialEntropy


@detectors.register("xaiadv:KNNDetector")
class KNNDetector(_ARTDetector):
    """Carrara et al. 2017 (seeds/003, eq. 2), :class:`~xaiadv.plugins.detectors.KNNScore`: one minus the kNN
    score of the predicted class on deep features; one global threshold at ``fpr``, its ties broken by the
    mean neighbour distance. ``report`` adds ``"mean_distance"`` (N,) and ``"distance_threshold"``."""

    plugin_class = plugin_detectors.KNNScore

    @property
    def distance_threshold_(self) -> float | np.ndarray | None:
        """The tie-break threshold on the mean neighbour distance."""
        self._check_fitted()
        return self.plugin_.tie_break_threshold_

    def _report(self, report: dict[str, Any], decision: Decision) -> dict[str, Any]:
        tie = self.plugin_.tie_break_threshold_
        return {**report, "mean_distance": _numpy(decision.tie_break), "distance_threshold": tie}


@detectors.register("xaiadv:IDefenderDetector")
class IDefenderDetector(_ARTDetector):
    """Zheng & Hong 2018 (seeds/002, eqs. 4-5), :class:`~xaiadv.plugins.detectors.IDefender`: -log p(hidden |
    predicted class) under that class's Gaussian mixture; one threshold per predicted class.

    ``keep``: the paper's share of clean samples kept per class (ID-95: keep=0.95); None (default) means
    ``1 - fpr``, a given ``keep`` takes precedence. ``calibration_share`` is 0.3 here: each class needs enough
    held-out samples (digits CNN, 8 split seeds, clean test FPR at fpr=0.05: share 0.2 -> 0.064 .. 0.087,
    0.3 -> 0.042 .. 0.070). ``random_state`` seeds the split and the mixtures.
    """

    plugin_class = plugin_detectors.IDefender
    own_params: ClassVar[dict[str, Any]] = {"keep": None}
    calibration_params: ClassVar[dict[str, Any]] = {
        **_ARTDetector.calibration_params,
        "calibration_share": 0.3,
    }
    threshold_params: ClassVar[frozenset[str]] = frozenset({"fpr", "keep"})
    saved_names: ClassVar[tuple[str, ...]] = ("IDefender",)  # its name before issue 12

    @property
    def keep_(self) -> float:
        """The share of clean samples kept per class: ``keep``, or ``1 - fpr`` when keep is None."""
        return 1.0 - float(self.fpr) if self.keep is None else float(self.keep)

    def _check_params(self) -> None:
        if self.keep is not None:
            checks.open_fraction("keep", self.keep)
        super()._check_params()

    def _fpr(self) -> float:
        return 1.0 - self.keep_


@detectors.register("xaiadv:LRPSignatureDetector")
class LRPSignatureDetector(IDefenderDetector):
    """LRP signatures (seed 001 section 3.3, after Fidel et al. 2020),
    :class:`~xaiadv.plugins.detectors.LRPSignature`: I-defender's per-class mixtures on the LRP relevance of
    the last layer's input instead of its activations; ``keep`` and the calibration as I-defender's."""

    plugin_class = plugin_detectors.LRPSignature
    saved_names: ClassVar[tuple[str, ...]] = ()
