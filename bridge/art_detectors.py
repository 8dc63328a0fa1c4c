"""The three detectors as ART evasion detectors: ``KNNDetector(classifier).fit(x, y)``, then ``detect(x)``.

Each takes an ART ``PyTorchClassifier``: its torch module (``classifier.model``, read by layer name, never
ART's integer ``get_activations``) and its ``preprocessing=(mean, std)`` go to the plugin detector
(:mod:`xaiadv.plugins.detectors`). ``fit`` holds out a seeded, per-class share ``calibration_share`` of the
clean data, fits the plugin on the rest and sets the threshold on the held-out share at the target
false-positive rate ``fpr`` (:mod:`xaiadv.plugins.calibration`): one global threshold for the kNN and
spatial-entropy scores (the kNN's ties broken by the mean neighbour distance, see :class:`KNNDetector`),
the plugin's per-class thresholds for I-defender. The held-out clean scores are kept (``calibration_``),
so ``set_params(fpr=...)`` on a fitted detector moves its threshold without fitting again.
``save``/``load`` write safetensors + a JSON manifest, never pickle.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ._common import require

require("art", "art")
from art.defences.detector.evasion import EvasionDetector  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402
from safetensors.numpy import load as load_safetensors  # noqa: E402
from safetensors.numpy import save as save_safetensors  # noqa: E402

from xaiadv.plugins import detectors as plugin_detectors  # noqa: E402
from xaiadv.plugins.calibration import (  # noqa: E402
    check_fpr,
    flag_tie_broken,
    threshold_at_fpr,
    tie_broken_threshold_at_fpr,
)
from xaiadv.plugins.checks import check_labels  # noqa: E402
from xaiadv.plugins.modes import eval_mode  # noqa: E402
from xaiadv.plugins.storage import atomic_write  # noqa: E402

from ._art_classifier import classifier_preprocessing  # noqa: E402

__all__ = ["IDefender", "KNNDetector", "SpatialEntropyDetector"]

#: Version of the save format; ``load`` reads this one and the older ones, and refuses newer manifests.
#: 2 added the clean calibration scores (re-calibration after load) and the kNN's tie-break threshold.
SCHEMA_VERSION = 2
#: The base name ``save``/``load`` use inside a folder: ``save("out/")`` writes ``out/detector.safetensors``
#: and ``out/detector.json``.
DEFAULT_NAME = "detector"
_CALIBRATION_PREFIX = "calibration."
_RECORD_KEY = "xaiadv_detector"
_REFIT = "fit the detector again and save it"


def classifier_hash(classifier: PyTorchClassifier) -> str:
    """sha256 of the classifier's state_dict: names, dtypes, shapes and bytes of every tensor, in order."""
    digest = hashlib.sha256()
    for name, tensor in classifier.model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(given path, tensors file ``<base>.safetensors``, manifest ``<base>.json``).

    The base is ``path`` without a ``.safetensors``/``.json`` suffix; for an existing folder, or a path
    written with a trailing separator, it is :data:`DEFAULT_NAME` inside that folder.
    """
    text = os.fspath(path)
    given = Path(text)
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if given.is_dir() or text.endswith(separators):
        base = given / DEFAULT_NAME
    else:
        base = given.with_suffix("") if given.suffix in (".safetensors", ".json") else given
    return given, base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _make_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents (as ART's own ``save`` does); a file in the way is named."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(
            f"cannot save the detector into {folder}: a file is in the way where a folder should be"
        ) from None


def _is_safetensors(data: bytes) -> bool:
    """The safetensors layout: 8-byte little-endian header length, then a JSON header starting with '{'."""
    if len(data) < 10:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    return 2 <= length <= len(data) - 8 and data[8:9] == b"{"


def _not_safetensors(path: Path) -> ValueError:
    return ValueError(
        f"{path} is not a safetensors file (truncated, or a pickle or foreign file?); xaiadv never "
        f"unpickles detectors: {_REFIT}"
    )


def _record(data: bytes, path: Path) -> dict[str, Any]:
    """The record saved in the safetensors header's metadata (detector, config, fitted, hashes)."""
    (length,) = struct.unpack("<Q", data[:8])
    try:
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
        record = json.loads(metadata[_RECORD_KEY])
    except (KeyError, ValueError, AttributeError, TypeError):
        raise ValueError(f"{path} holds no xaiadv detector record: {_REFIT}") from None
    keys = {"detector", "config", "threshold", "fitted", "classifier_sha256"}
    if not isinstance(record, dict) or set(record) != keys:
        raise ValueError(f"{path} holds no valid xaiadv detector record: {_REFIT}")
    return record


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


class _ARTDetector(EvasionDetector):
    """Shared body: configuration, split, calibration, detect, save and load; subclasses name the plugin."""

    #: The plugin detector this adapter wraps, and the parameters of it the adapter exposes (with defaults).
    plugin_class: ClassVar[type]
    plugin_params: ClassVar[dict[str, Any]]
    #: The adapter's own parameters, with their defaults.
    calibration_params: ClassVar[dict[str, Any]] = {
        "fpr": 0.05,
        "calibration_share": 0.2,
        "random_state": 0,
    }
    defence_params: ClassVar[list[str]]
    #: Parameters that only move the threshold: changed on a fitted detector, it is re-calibrated from the
    #: stored clean calibration scores instead of discarding the fit.
    threshold_params: ClassVar[frozenset[str]] = frozenset({"fpr"})
    #: The arrays of ``calibration_`` (and of :meth:`_score_parts`), as saved under ``calibration.<key>``.
    calibration_keys: ClassVar[tuple[str, ...]] = ("score",)

    def __init__(self, classifier: PyTorchClassifier, **params: Any) -> None:
        super().__init__()
        if not isinstance(classifier, PyTorchClassifier):
            raise TypeError(
                f"{type(self).__name__} needs an ART PyTorchClassifier (it reads the torch module by layer "
                f"name); got {type(classifier).__name__}"
            )
        defaults = {**self.plugin_params, **self.calibration_params}
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise TypeError(
                f"unknown parameter(s) {unknown} for {type(self).__name__}; valid: {sorted(defaults)}"
            )
        self.classifier = classifier
        for key, value in {**defaults, **params}.items():
            setattr(self, key, value)
        self._check_params()

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # -------------------------------------------------------------------------------------- parameters
    def _check_params(self) -> None:
        """One validator: the adapter checks its own parameters, a fresh plugin checks the plugin's."""
        check_fpr(self.fpr)
        share = self.calibration_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ValueError(f"calibration_share must be a number in (0, 1); got {share!r}")
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, int):
            raise ValueError(f"random_state must be an int; got {self.random_state!r}")
        self._make_plugin(batch_size=128)

    def set_params(self, **kwargs: Any) -> None:
        """Set parameters by name, all or nothing: an unknown name or a refused value changes nothing.

        On a fitted detector, changing only :attr:`threshold_params` (``fpr``; I-defender also ``keep``)
        re-calibrates the threshold from the stored clean calibration scores: the fit, and so every score,
        is kept. A detector loaded from a version-1 save has no such scores: that raises a RuntimeError
        saying to fit again, and changes nothing. Any other changed value discards the fit (the fitted
        state belongs to the old configuration): fit again.
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
            if changed and hasattr(self, "threshold_"):
                if set(changed) <= self.threshold_params:
                    self._recalibrate(changed)
                else:
                    self._unfit(changed)
        except Exception:
            for key, value in before.items():
                setattr(self, key, value)
            raise

    def _recalibrate(self, changed: list[str]) -> None:
        """New thresholds at the current parameters from ``calibration_``; the plugin's fit is untouched."""
        if not hasattr(self, "calibration_"):
            raise RuntimeError(
                f"set_params({', '.join(changed)}) cannot re-calibrate this {type(self).__name__}: it was "
                f"loaded from a save without its clean calibration scores (schema_version 1); fit the "
                f"detector again (or save it again after fitting it with this xaiadv)"
            )
        for name, value in self._thresholds_from(self.plugin_, self.calibration_).items():
            setattr(self, name, value)

    def _unfit(self, changed: list[str]) -> None:
        for name in ("plugin_", "threshold_", "calibration_", *self._threshold_attributes()):
            self.__dict__.pop(name, None)
        self._discarded = f"set_params changed {changed}, which the fit depends on"

    def _threshold_attributes(self) -> tuple[str, ...]:
        """Fitted attributes besides ``threshold_`` that :meth:`_thresholds_from` sets."""
        return ()

    # ------------------------------------------------------------------------------------------- input
    def _as_tensor(self, x: object, name: str = "x") -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy array; got {type(x).__name__}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
        shape = tuple(self.classifier.input_shape)
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name} must be shaped (N, {', '.join(map(str, shape))}); got {x.shape}")
        if x.size and not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or Inf values")
        return torch.as_tensor(np.array(x, dtype=np.float32)).to(self.classifier.device)

    @staticmethod
    def _check_batch_size(batch_size: object) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be an int > 0; got {batch_size!r}")
        return batch_size

    def _preprocessing(self) -> tuple[np.ndarray, np.ndarray] | None:
        like = np.zeros((1, *self.classifier.input_shape), dtype=np.float32)
        try:
            return classifier_preprocessing(self.classifier, like)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error} (detectors need the same)") from None

    # --------------------------------------------------------------------------------------- fit/detect
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 128,
        *,
        x_calibration: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        """Fit on clean ``x`` (N, *input_shape) with true labels ``y`` ((N,) indices or (N, K) one-hot).

        A seeded share ``calibration_share`` of each class is held out; the plugin is fitted on the rest and
        the threshold set on the held-out share at ``fpr``. With ``x_calibration`` (clean inputs of another
        split, e.g. held-out test images) the plugin is fitted on all of ``x`` and the threshold set on
        ``x_calibration`` instead: images the network was trained on can score unlike unseen ones.
        Fitted: ``plugin_``, ``threshold_``, and ``calibration_`` (the clean calibration scores, a dict of
        arrays, kept so that ``set_params(fpr=...)`` re-calibrates without fitting again).
        """
        if kwargs:
            raise TypeError(f"fit() got unexpected keyword argument(s) {sorted(kwargs)}")
        batch_size = self._check_batch_size(batch_size)
        x_tensor = self._as_tensor(x)
        labels = check_labels(y, x_tensor.shape[0], self.classifier.nb_classes, torch.device("cpu")).numpy()
        device = x_tensor.device
        if x_calibration is None:
            fit_rows, calibration_rows = self._split(labels)
            x_fit = x_tensor[torch.as_tensor(fit_rows, device=device)]
            y_fit = torch.as_tensor(labels[fit_rows], device=device)
            x_held = x_tensor[torch.as_tensor(calibration_rows, device=device)]
        else:
            x_held = self._as_tensor(x_calibration, "x_calibration")
            if x_held.shape[0] == 0:
                raise ValueError("x_calibration: expected at least one clean sample to set the threshold on")
            x_fit, y_fit = x_tensor, torch.as_tensor(labels, device=device)
        plugin = self._make_plugin(batch_size)
        with eval_mode(self.classifier.model):
            plugin.fit(x_fit, y_fit)
            calibration = self._score_parts(plugin, x_held)
        thresholds = self._thresholds_from(plugin, calibration)
        self.plugin_, self.calibration_ = plugin, calibration
        for name, value in thresholds.items():
            setattr(self, name, value)
        self.__dict__.pop("_discarded", None)

    def _split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fitting rows, calibration rows): seeded shuffle, ``calibration_share`` of each class held out."""
        n = labels.size
        counts = np.bincount(labels, minlength=self.classifier.nb_classes)
        held = np.round(self.calibration_share * counts).astype(int)
        order = np.random.default_rng(self.random_state).permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]  # shuffled within each class
        rank = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
        is_calibration = rank < np.repeat(held, counts)
        if not is_calibration.any() or is_calibration.all():
            raise ValueError(
                f"calibration_share={self.calibration_share} of {n} samples leaves no "
                f"{'calibration' if not is_calibration.any() else 'fitting'} samples; give more clean data"
            )
        return np.sort(order[~is_calibration]), np.sort(order[is_calibration])

    def _score_parts(self, plugin: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
        """What detection compares with the threshold, per sample: {"score": (N,) float64} here.

        The same for calibration (kept as ``calibration_``) and detection; subclasses add what their
        threshold needs (:attr:`calibration_keys`).
        """
        return {"score": _numpy(plugin.score(x), np.float64)}

    def _thresholds_from(self, plugin: Any, calibration: dict[str, np.ndarray]) -> dict[str, Any]:
        """The threshold attributes at the current parameters: one global threshold at ``fpr`` here."""
        return {"threshold_": threshold_at_fpr(calibration["score"], self.fpr)}

    def _decide(self, parts: dict[str, np.ndarray]) -> tuple[dict[str, Any], np.ndarray]:
        """(report, is_adversarial) from :meth:`_score_parts`: score > threshold."""
        threshold = float(self.threshold_)
        return {"score": parts["score"], "threshold": threshold}, parts["score"] > threshold

    def detect(self, x: np.ndarray, batch_size: int = 128, **kwargs: Any) -> tuple[dict, np.ndarray]:
        """(report, is_adversarial): report["score"] (N,) float64, higher = more likely adversarial,
        report["threshold"] (a float, or (N,) per sample); is_adversarial (N,) bool, score > threshold
        (the kNN detector breaks ties at the threshold, see :class:`KNNDetector`)."""
        if kwargs:
            raise TypeError(f"detect() got unexpected keyword argument(s) {sorted(kwargs)}")
        self._check_fitted()
        batch_size = self._check_batch_size(batch_size)
        x_tensor = self._as_tensor(x)
        self.plugin_.batch_size = batch_size
        with eval_mode(self.classifier.model):
            parts = self._score_parts(self.plugin_, x_tensor)
        return self._decide(parts)

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            reason = getattr(self, "_discarded", None)
            raise RuntimeError(
                f"this {type(self).__name__} is not fitted yet: call fit(x, y) first"
                + (f" ({reason})" if reason else "")
            )

    # --------------------------------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``<path>.safetensors`` (fitted arrays) and ``<path>.json`` (manifest), each atomically.

        ``path`` an existing folder (or written with a trailing separator, ``"out/"``): the files are
        ``<path>/detector.safetensors`` and ``<path>/detector.json`` (:data:`DEFAULT_NAME`). Missing folders
        are created, as ART's own ``save`` does. ``load`` takes the same ``path``.
        """
        self._check_fitted()
        _, tensors_path, manifest_path = _paths(path)
        arrays, fitted = self._state()
        for key, value in getattr(self, "calibration_", {}).items():
            arrays[_CALIBRATION_PREFIX + key] = value
        record = {
            "detector": type(self).__name__,
            "config": self.get_params(),
            "threshold": np.asarray(self.threshold_).tolist(),
            "fitted": fitted,
            "classifier_sha256": classifier_hash(self.classifier),
        }
        # The record is also inside the (hashed) tensors file, so an edited manifest is caught on load.
        data = save_safetensors(
            {key: np.ascontiguousarray(value) for key, value in arrays.items()},
            metadata={_RECORD_KEY: json.dumps(record, sort_keys=True)},
        )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            **record,
            "tensors_file": tensors_path.name,
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
        }
        _make_folder(tensors_path.parent)
        atomic_write(tensors_path, data)
        atomic_write(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str], classifier: PyTorchClassifier) -> _ARTDetector:
        """The detector saved at ``path``, for ``classifier`` (the one it was fitted with: hash checked).

        ``path`` as given to :meth:`save` (a folder means :data:`DEFAULT_NAME` inside it). Saves of every
        schema version up to :data:`SCHEMA_VERSION` are read; a version-1 save has no calibration scores,
        so ``set_params(fpr=...)`` on it asks for a new fit.
        """
        given, tensors_path, manifest_path = _paths(path)
        if given.is_file() and given != manifest_path:
            if not _is_safetensors(given.read_bytes()):
                raise _not_safetensors(given)
            if given != tensors_path:
                raise ValueError(f"{given} is not an xaiadv detector save: load <base> for <base>.json")
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{manifest_path} is not a readable manifest ({error}): {_REFIT}") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{manifest_path} is not an xaiadv detector manifest: {_REFIT}")
        version = manifest.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise ValueError(
                f"{manifest_path} has schema_version {version!r}; this xaiadv reads versions 1 to "
                f"{SCHEMA_VERSION} (upgrade xaiadv, or {_REFIT})"
            )
        if manifest.get("detector") != cls.__name__:
            raise ValueError(
                f"{manifest_path} holds a {manifest.get('detector')!r} detector, not a {cls.__name__}: "
                f"load it with that class, or {_REFIT}"
            )
        data = tensors_path.read_bytes()
        if not _is_safetensors(data):
            raise _not_safetensors(tensors_path)
        if hashlib.sha256(data).hexdigest() != manifest.get("tensors_sha256"):
            raise ValueError(
                f"{tensors_path} does not match its manifest's sha256 (truncated or modified): {_REFIT}"
            )
        record = _record(data, tensors_path)
        edited = [key for key in record if _canonical(record[key]) != _canonical(manifest.get(key))]
        if edited:
            raise ValueError(
                f"{manifest_path} does not match the record inside {tensors_path.name} (edited: {edited}): "
                f"{_REFIT}"
            )
        if not isinstance(classifier, PyTorchClassifier):
            raise TypeError(f"classifier must be an ART PyTorchClassifier; got {type(classifier).__name__}")
        try:
            detector = cls(classifier, **record["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{manifest_path} holds an invalid configuration ({error}): {_REFIT}") from None
        if classifier_hash(classifier) != record["classifier_sha256"]:
            raise ValueError(
                f"{manifest_path} was fitted with a different classifier (parameter hash mismatch): the "
                f"detector describes that network's features only; {_REFIT} with this classifier"
            )
        try:
            arrays = load_safetensors(data)
            calibration = _calibration_arrays(arrays, cls.calibration_keys)
            plugin_arrays = {k: v for k, v in arrays.items() if not k.startswith(_CALIBRATION_PREFIX)}
            detector._restore(plugin_arrays, record["fitted"], record["threshold"])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"{tensors_path} could not be restored ({error}): {_REFIT}") from None
        if calibration is not None:
            detector.calibration_ = calibration
        return detector

    @abc.abstractmethod
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Each detector class defines it."""

    @abc.abstractmethod
    def _restore(self, arrays: dict[str, np.ndarray], fitted: dict[str, Any], threshold: Any) -> None:
        """Each detector class defines it."""

    def _make_plugin(self, batch_size: int) -> Any:
        """The unfitted plugin with this adapter's parameters and the classifier's preprocessing."""
        return self.plugin_class(
            self.classifier.model,
            **self._plugin_kwargs(),
            batch_size=batch_size,
            preprocessing=self._preprocessing(),
        )

    def _plugin_kwargs(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.plugin_params}

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(np.array(array), dtype=dtype).to(self.classifier.device)


def _numpy(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(dtype)


def _calibration_arrays(arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The saved ``calibration_``, checked for its keys; None when there is none (a version-1 save, or one
    of a detector loaded from a version-1 save)."""
    found = {k[len(_CALIBRATION_PREFIX) :]: v for k, v in arrays.items() if k.startswith(_CALIBRATION_PREFIX)}
    if not found:
        return None
    if sorted(found) != sorted(keys):
        raise ValueError(f"the calibration arrays are {sorted(found)}, expected {sorted(keys)}")
    lengths = {value.shape for value in found.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(
            f"the calibration arrays must be 1-D and of one length; got shapes {sorted(lengths)}"
        )
    return found


def _defence_params(plugin_params: dict[str, Any]) -> list[str]:
    return [*plugin_params, *_ARTDetector.calibration_params]


class SpatialEntropyDetector(_ARTDetector):
    """Amirian et al. 2018 (seeds/000, eqs. 3-4) as an ART detector: mean local spatial entropy of the
    guided-backprop feature response; one global threshold at ``fpr`` on held-out clean scores.

    Parameters: layer (default the last Conv2d), target ("activations" or "logit"), patch (3), fpr,
    calibration_share, random_state. Saved state: the clean-score statistics and the threshold.
    """

    plugin_class = plugin_detectors.SpatialEntropy
    plugin_params: ClassVar[dict[str, Any]] = {"layer": None, "target": "activations", "patch": 3}
    defence_params: ClassVar[list[str]] = _defence_params(plugin_params)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        plugin = self.plugin_
        statistics = [plugin.clean_mean_, plugin.clean_std_, plugin.clean_degenerate_rate_]
        arrays = {"clean_statistics": np.asarray(statistics, dtype=np.float64)}
        return arrays, {"input_shape": list(plugin.input_shape_)}

    def _restore(self, arrays: dict[str, np.ndarray], fitted: dict[str, Any], threshold: Any) -> None:
        plugin = self._make_plugin(batch_size=128)
        mean, std, degenerate = (float(value) for value in arrays["clean_statistics"])
        plugin.input_shape_ = tuple(fitted["input_shape"])
        plugin.n_features_in_ = math.prod(plugin.input_shape_)
        plugin.clean_mean_, plugin.clean_std_, plugin.clean_degenerate_rate_ = mean, std, degenerate
        self.plugin_, self.threshold_ = plugin, float(threshold)


class KNNDetector(_ARTDetector):
    """Carrara et al. 2017 (seeds/003, eq. 2) as an ART detector: one minus the kNN score of the predicted
    class among the deep features of the fitting images; one global threshold at ``fpr``, ties broken.

    Ties: the score takes few values (multiples of 1/k with uniform weights; exactly 1 whenever none of the
    k neighbours has the predicted class), so many clean calibration scores can sit on the fpr quantile.
    Measured with a 4-channel digits CNN: 11% of clean scores were exactly 1, the threshold was 1, and
    ``score > threshold`` flagged no image at all, clean or adversarial. Samples tied with the threshold are
    therefore ordered by their mean distance to the k neighbours (further from the fitting data: more
    likely adversarial): flagged = score > threshold, or score == threshold and mean distance >
    distance threshold, both thresholds set on the held-out clean pairs
    (:func:`~xaiadv.plugins.calibration.tie_broken_threshold_at_fpr`). ``report["score"]`` stays eq. 2's
    score (the ROC of the paper); the report adds ``"mean_distance"`` (N,) and ``"distance_threshold"``.

    Parameters: layer (default the last Conv2d), k, weighting ("uniform", "rank", "distance"), preprocess
    (None, "l2", "pca"), n_components (PCA width; None: as many as the features allow, at most 256, see
    :class:`~xaiadv.plugins.detectors.KNNScore`), chunk_size (search memory), backend ("torch", or "faiss"
    for large reference sets: ``pip install xaiadv[faiss]``; the same neighbours), fpr, calibration_share,
    random_state. Saved state: reference features, labels and predicted classes, the PCA arrays and width,
    the clean calibration scores and mean distances, both thresholds.
    """

    plugin_class = plugin_detectors.KNNScore
    plugin_params: ClassVar[dict[str, Any]] = {
        "layer": None,
        "k": 10,
        "weighting": "uniform",
        "preprocess": "l2",
        "n_components": None,
        "chunk_size": 2048,
        "backend": "torch",
    }
    defence_params: ClassVar[list[str]] = _defence_params(plugin_params)
    calibration_keys: ClassVar[tuple[str, ...]] = ("score", "distance")

    def _score_parts(self, plugin: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
        score, distance = plugin.score_and_distance(x)
        return {"score": _numpy(score, np.float64), "distance": _numpy(distance, np.float64)}

    def _thresholds_from(self, plugin: Any, calibration: dict[str, np.ndarray]) -> dict[str, Any]:
        threshold, distance = tie_broken_threshold_at_fpr(
            calibration["score"], calibration["distance"], self.fpr
        )
        return {"threshold_": threshold, "distance_threshold_": distance}

    def _threshold_attributes(self) -> tuple[str, ...]:
        return ("distance_threshold_",)

    def _decide(self, parts: dict[str, np.ndarray]) -> tuple[dict[str, Any], np.ndarray]:
        threshold, distance_threshold = float(self.threshold_), float(self.distance_threshold_)
        report = {
            "score": parts["score"],
            "threshold": threshold,
            "mean_distance": parts["distance"],
            "distance_threshold": distance_threshold,
        }
        return report, flag_tie_broken(parts["score"], parts["distance"], threshold, distance_threshold)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        plugin = self.plugin_
        arrays = {
            "reference_features": plugin.reference_features_.cpu().numpy(),
            "reference_labels": plugin.reference_labels_.cpu().numpy().astype(np.int64),
            "reference_predictions": plugin.reference_predictions_.cpu().numpy().astype(np.int64),
        }
        if plugin.preprocess == "pca":
            arrays["pca_mean"] = plugin.pca_mean_.cpu().numpy()
            arrays["pca_projection"] = plugin.pca_projection_.cpu().numpy()
        fitted = {
            "layer": plugin.layer_,
            "n_classes": plugin.n_classes_,
            "input_shape": list(plugin.input_shape_),
            "raw_feature_dim": plugin.raw_feature_dim_,
            "n_components": plugin.n_components_ if plugin.preprocess == "pca" else None,
            # None: no tie-break (loaded from a version-1 save); JSON has no infinity
            "distance_threshold": None if math.isinf(self.distance_threshold_) else self.distance_threshold_,
        }
        return arrays, fitted

    def _restore(self, arrays: dict[str, np.ndarray], fitted: dict[str, Any], threshold: Any) -> None:
        plugin = self._make_plugin(batch_size=128)
        plugin.layer_ = fitted["layer"]
        plugin.n_classes_ = int(fitted["n_classes"])
        plugin.input_shape_ = tuple(fitted["input_shape"])
        plugin.raw_feature_dim_ = int(fitted["raw_feature_dim"])
        if plugin.preprocess == "pca":
            plugin.pca_mean_ = self._tensor(arrays["pca_mean"], torch.float64)
            plugin.pca_projection_ = self._tensor(arrays["pca_projection"], torch.float64)
            width = plugin.pca_projection_.shape[1]
            plugin.n_components_ = int(fitted.get("n_components") or width)  # version 1: the width
            if plugin.n_components_ != width:
                raise ValueError(f"n_components {plugin.n_components_} but a PCA projection of width {width}")
        plugin.reference_labels_ = self._tensor(arrays["reference_labels"], torch.long)
        plugin.reference_predictions_ = self._tensor(arrays["reference_predictions"], torch.long)
        plugin.reference_features_ = self._tensor(arrays["reference_features"], torch.float32)
        # version 1 had no tie-break: an infinite distance threshold flags exactly score > threshold
        distance_threshold = fitted.get("distance_threshold")
        self.distance_threshold_ = math.inf if distance_threshold is None else float(distance_threshold)
        self.plugin_, self.threshold_ = plugin, float(threshold)


class IDefender(_ARTDetector):
    """Zheng & Hong 2018 (seeds/002, eqs. 4-5) as an ART detector: score = -log p(hidden | predicted class)
    under that class's Gaussian mixture; per-class thresholds from the plugin, set on held-out clean data.

    ``fpr`` and ``keep``: ``keep`` is the paper's name for the share of clean samples kept per class
    (ID-95: keep=0.95). ``keep=None`` (default) means ``keep = 1 - fpr``; a given ``keep`` takes precedence
    and ``fpr`` is then not used. The per-class thresholds are the plugin's ``calibrate`` on the held-out
    share, grouped by the predicted class as detection groups them; ``report["threshold"]`` is each sample's
    predicted-class threshold in score units (``-log-likelihood``).

    Parameters: layer (default: the input of the last Linear), n_components, covariance_type, reg_covar,
    keep, fpr, calibration_share (default 0.3 here, see below), random_state. Saved state: the plugin's
    ``to_state()`` (every mixture's weights_, means_, covariances_, precisions_cholesky_, converged_,
    n_iter_, lower_bound_; kept_features_ and thresholds_), restored by ``IDefender.from_state``.
    """

    plugin_class = plugin_detectors.IDefender
    plugin_params: ClassVar[dict[str, Any]] = {
        "layer": None,
        "n_components": 5,
        "covariance_type": "full",
        "reg_covar": 1e-2,
        "keep": None,
    }
    #: calibration_share 0.3, not 0.2: thresholds are per class, so each class needs enough held-out
    #: samples (module docstring of the plugin: the unseen rate is about (m + 1) / (n + 1) for the top m
    #: of n flagged). Measured on the digits CNN, 8 split seeds, clean test FPR at fpr=0.05:
    #: share 0.2 -> 0.064 .. 0.087 (mean 0.075); share 0.3 -> 0.042 .. 0.070 (mean 0.059).
    calibration_params: ClassVar[dict[str, Any]] = {
        **_ARTDetector.calibration_params,
        "calibration_share": 0.3,
    }
    defence_params: ClassVar[list[str]] = _defence_params(plugin_params)
    threshold_params: ClassVar[frozenset[str]] = frozenset({"fpr", "keep"})
    calibration_keys: ClassVar[tuple[str, ...]] = ("score", "prediction")

    @property
    def keep_(self) -> float:
        """The share of clean samples kept per class: ``keep``, or ``1 - fpr`` when keep is None."""
        return 1.0 - float(self.fpr) if self.keep is None else float(self.keep)

    def _plugin_kwargs(self) -> dict[str, Any]:
        return {
            **super()._plugin_kwargs(),
            "keep": 1.0 - float(check_fpr(self.fpr)) if self.keep is None else self.keep,
            "calibration": "train",  # the adapter sets the thresholds itself, on its own calibration data
            "random_state": self.random_state,
        }

    def _score_parts(self, plugin: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
        score, prediction = plugin.score_and_prediction(x)
        return {"score": _numpy(score, np.float64), "prediction": _numpy(prediction, np.int64)}

    def _thresholds_from(self, plugin: Any, calibration: dict[str, np.ndarray]) -> dict[str, Any]:
        """The plugin's per-class thresholds at ``keep_``, grouped by predicted class as detection groups."""
        plugin.calibrate_scores(calibration["score"], calibration["prediction"], keep=self.keep_)
        plugin.keep = self.keep_
        return {"threshold_": -plugin.thresholds_.cpu().numpy().astype(np.float64)}  # -log-likelihood

    def _decide(self, parts: dict[str, np.ndarray]) -> tuple[dict[str, Any], np.ndarray]:
        threshold = self.threshold_[parts["prediction"]]
        return {"score": parts["score"], "threshold": threshold}, parts["score"] > threshold

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self.plugin_.to_state()

    def _restore(self, arrays: dict[str, np.ndarray], fitted: dict[str, Any], threshold: Any) -> None:
        plugin = plugin_detectors.IDefender.from_state(
            self.classifier.model, arrays, fitted, preprocessing=self._preprocessing(), batch_size=128
        )
        self.plugin_, self.threshold_ = plugin, -plugin.thresholds_.numpy()
