"""``Detector``: the one contract every detector keeps, scikit-learn shaped, so that studies, adapters and
adaptive attacks treat them alike.

``fit(x, y) -> self`` extracts what the method needs from clean data, once, and fits (fitted attributes end
in ``_``). ``calibrate(x, y=None, fpr=0.05, per_class=...) -> self`` sets the threshold on clean data at a
target false-positive rate (:mod:`xaiadv.plugins.calibration`). ``score(x)`` gives one number per sample,
higher meaning more likely adversarial; ``score_torch(x)`` the same number differentiable in ``x`` where the
method allows it (NotImplementedError where it does not). ``detect(x)`` flags score > threshold (a detector
with a tie-break score, the kNN's, splits the samples tied with the threshold by it). ``get_state()`` and
``from_state(model, arrays, state)`` give the fitted, calibrated detector as arrays plus a JSON-able dict,
never a pickle (:mod:`xaiadv.plugins.storage` writes them). Used before ``fit``, or ``detect`` before
``calibrate``: scikit-learn's ``NotFittedError``.

Every call runs the model in eval mode (each module's flag restored after, even on error), leaves no hook
on it and never modifies the caller's tensors. A detector takes a :class:`~xaiadv.plugins.model.Classifier`,
or a plain module and ``preprocessing=(mean, std)`` that it wraps into one.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import nn

from .. import checks
from ..calibration import Threshold, check_fpr, held_out_split, thresholds_at_fpr
from ..checks import check_batch, check_labels
from ..model import Classifier

#: Per-sample parts of a score (:meth:`Detector._parts`): "score" (N,) float64, "class" (N,) the class the
#: model predicts, and "tie_break" (N,) float64 for a detector whose score ties (the kNN's).
Parts = dict[str, torch.Tensor]
_CALIBRATION = "calibration."
_CALIBRATED = ("calibration_", "threshold_", "tie_break_threshold_", "fpr_", "per_class_")


@dataclass(frozen=True)
class Decision:
    """What :meth:`Detector.decide` found, per sample (N,): the score, the threshold it was compared with
    (its predicted class's when per class), the flags; the tie-break score and threshold where used."""

    score: torch.Tensor
    threshold: torch.Tensor
    flags: torch.Tensor
    tie_break: torch.Tensor | None = None
    tie_break_threshold: torch.Tensor | None = None


class Detector(abc.ABC):
    """The contract (module docstring); a detector implements ``_fit``, ``_parts``, ``_fitted_state`` and
    ``_restore``, and sets ``input_shape_`` and ``n_classes_`` when fitted.

    Calibrated attributes: ``calibration_`` (the clean calibration parts as numpy arrays, kept so that
    :meth:`recalibrate` moves the threshold without a forward pass), ``threshold_`` (a float, or
    (n_classes,) float64 per class), ``tie_break_threshold_`` (likewise, or None), ``fpr_``, ``per_class_``.
    """

    #: Constructor parameters that describe the method, saved by :meth:`get_state` (the model,
    #: ``preprocessing`` and ``batch_size`` are the caller's, given again to :meth:`from_state`).
    config_names: ClassVar[tuple[str, ...]]
    #: Whether :meth:`calibrate` sets one threshold per class unless told otherwise (the paper's rule).
    per_class_default: ClassVar[bool] = False

    def __init__(self, model: Classifier | nn.Module, *, batch_size: int, preprocessing: object) -> None:
        self.classifier = Classifier.wrap(model, preprocessing=preprocessing)
        self.batch_size = checks.positive_int("batch_size", batch_size)

    @property
    def model(self) -> nn.Module:
        """The torch module the detector reads."""
        return self.classifier.module

    def get_config(self) -> dict[str, Any]:
        """The constructor parameters in :attr:`config_names`, as given."""
        return {name: getattr(self, name) for name in self.config_names}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"

    # ------------------------------------------------------------------------- what each detector gives
    @abc.abstractmethod
    def _fit(self, x: torch.Tensor, y: object) -> None:
        """Fit on checked, detached clean ``x`` (in eval mode); set the fitted attributes at the end."""

    @abc.abstractmethod
    def _parts(self, x: torch.Tensor) -> Parts:
        """:data:`Parts` of ``x`` (N, *input_shape_), checked, in eval mode, in mini-batches."""

    @abc.abstractmethod
    def _fitted_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The fitted attributes as (arrays, JSON-able dict); calibration is added by :meth:`get_state`."""

    @abc.abstractmethod
    def _restore(self, arrays: Mapping[str, np.ndarray], fitted: Mapping[str, Any]) -> None:
        """Set the fitted attributes from :meth:`_fitted_state`'s output, checked against the model."""

    # ------------------------------------------------------------------------------------- the contract
    def fit(self, x: torch.Tensor, y: object = None) -> Self:
        """Fit on clean ``x`` (N, ...) with labels ``y`` ((N,) indices or one-hot; unused where the
        method learns nothing from them); a refit drops the calibration of the previous fit."""
        x = check_batch(x).detach()
        with self.classifier.evaluating():
            self._fit(x, y)
        for name in _CALIBRATED:
            self.__dict__.pop(name, None)
        return self

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) float64 on x's device, higher meaning more likely adversarial; no graph (see score_torch)."""
        with torch.no_grad():
            return self._scored(x)["score"]

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`score` differentiable in ``x``, for detector-aware attacks; where the method allows it."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable score")

    def calibrate(
        self, x: torch.Tensor, y: object = None, *, fpr: float = 0.05, per_class: bool | None = None
    ) -> Self:
        """Set the threshold on clean ``x`` to flag at most ``fpr`` of it (score > threshold).

        ``per_class`` (default :attr:`per_class_default`): one threshold per class, the clean samples grouped
        by ``y`` when given, else by the class the model predicts (as :meth:`detect` groups them: it has no
        labels). A refused calibration (a class without samples, say) changes nothing.
        """
        fpr, per_class = check_fpr(fpr), self._per_class(per_class)
        self._check_fitted()
        x = check_batch(x, input_shape=self.input_shape_)
        if x.shape[0] == 0:
            raise ValueError("x is empty; calibration needs clean samples")
        labels = None if y is None else check_labels(y, x.shape[0], self.n_classes_, x.device)
        with torch.no_grad():
            parts = self._scored(x)
        if labels is not None:
            parts["class"] = labels
        calibration = {key: value.detach().cpu().numpy() for key, value in parts.items()}
        thresholds = self._thresholds(calibration, fpr, per_class)
        self.calibration_ = calibration
        self._set_thresholds(fpr, per_class, *thresholds)
        return self

    def recalibrate(self, *, fpr: float, per_class: bool | None = None) -> Self:
        """The threshold at another ``fpr`` from the clean scores :meth:`calibrate` kept: no forward pass,
        the same threshold :meth:`calibrate` gives on those images; ``per_class`` None keeps the current."""
        self._check_calibrated()
        fpr = check_fpr(fpr)
        per_class = self.per_class_ if per_class is None else checks.boolean("per_class", per_class)
        self._set_thresholds(fpr, per_class, *self._thresholds(self.calibration_, fpr, per_class))
        return self

    def fit_calibrated(
        self,
        x: torch.Tensor,
        y: object,
        *,
        fpr: float = 0.05,
        per_class: bool | None = None,
        calibration_share: float = 0.2,
        random_state: int = 0,
        x_calibration: torch.Tensor | None = None,
    ) -> Self:
        """:meth:`fit`, then :meth:`calibrate` on clean data the fit did not see.

        Without ``x_calibration``: a seeded share ``calibration_share`` of each class of ``x`` is held out
        (:func:`~xaiadv.plugins.calibration.held_out_split`), the fit uses the rest. With it (clean inputs of
        another split): the fit uses all of ``x``. Why: a threshold set on the fitting data is biased.
        """
        fpr, per_class = check_fpr(fpr), self._per_class(per_class)
        x = check_batch(x)
        labels = check_labels(y, x.shape[0], None, torch.device("cpu"))
        if x_calibration is None:
            fit_rows, held_rows = (
                torch.as_tensor(rows, device=x.device)
                for rows in held_out_split(labels.numpy(), calibration_share, random_state)
            )
            x_fit, y_fit, x_held = x[fit_rows], labels.to(x.device)[fit_rows], x[held_rows]
        else:
            x_held = check_batch(x_calibration, name="x_calibration")
            if x_held.shape[0] == 0:
                raise ValueError("x_calibration: expected at least one clean sample to set the threshold on")
            x_fit, y_fit = x, labels.to(x.device)
        return self.fit(x_fit, y_fit).calibrate(x_held, fpr=fpr, per_class=per_class)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) bool: score > threshold (ties split by the tie-break score where the detector has one)."""
        return self.decide(x).flags

    def decide(self, x: torch.Tensor) -> Decision:
        """:meth:`detect` with what it compared: scores and each sample's thresholds."""
        self._check_calibrated()
        with torch.no_grad():
            parts = self._scored(x)
        score = parts["score"]

        def per_sample(threshold: Threshold) -> torch.Tensor:
            value = torch.as_tensor(threshold, dtype=torch.float64, device=score.device)
            return value[parts["class"]] if self.per_class_ else value.expand_as(score)

        threshold = per_sample(self.threshold_)
        flags = score > threshold
        if self.tie_break_threshold_ is None:
            return Decision(score, threshold, flags)
        tie_break, tie_threshold = parts["tie_break"], per_sample(self.tie_break_threshold_)
        flags = flags | ((score == threshold) & (tie_break > tie_threshold))
        return Decision(score, threshold, flags, tie_break, tie_threshold)

    # -------------------------------------------------------------------------------------------- state
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-able dict): the fitted detector and, when calibrated, its calibration (the clean
        parts as ``calibration.<part>`` arrays; fpr, per_class and the thresholds in the dict).
        :meth:`from_state` inverts it."""
        self._check_fitted()
        arrays, fitted = self._fitted_state()
        calibration = None
        if hasattr(self, "calibration_"):
            arrays.update({_CALIBRATION + key: value for key, value in self.calibration_.items()})
            calibration = {
                "fpr": self.fpr_,
                "per_class": self.per_class_,
                "threshold": _to_json(self.threshold_),
                "tie_break_threshold": _to_json(self.tie_break_threshold_),
            }
        arrays = {key: np.array(value) for key, value in arrays.items()}  # copies: no memory shared
        state = {
            "detector": type(self).__name__,
            "config": self.get_config(),
            "fitted": fitted,
            "calibration": calibration,
        }
        return arrays, state

    @classmethod
    def from_state(
        cls,
        model: Classifier | nn.Module,
        arrays: Mapping[str, np.ndarray],
        state: Mapping[str, Any],
        **caller: Any,
    ) -> Self:
        """The detector :meth:`get_state` gave, for ``model`` (the network it was fitted on: checked by one
        forward where the state says what to expect). ``caller``: the constructor arguments that are not
        part of the fit (``batch_size``, ``preprocessing``)."""
        keys = {"detector", "config", "fitted", "calibration"}
        if not isinstance(state, Mapping) or set(state) != keys or state["detector"] != cls.__name__:
            raise ValueError(
                f"state must be the dict {cls.__name__}.get_state() returned; got {state!r:.200}"
            )
        detector = cls(model, **state["config"], **caller)
        with detector.classifier.evaluating(), torch.no_grad():
            detector._restore(arrays, state["fitted"])
        calibration = state["calibration"]
        if calibration is not None:
            parts = {
                k[len(_CALIBRATION) :]: np.array(v) for k, v in arrays.items() if k.startswith(_CALIBRATION)
            }
            if "score" not in parts or len({value.shape for value in parts.values()}) != 1:
                raise ValueError(
                    f"calibration arrays must hold 'score' and be of one shape; got {sorted(parts)}"
                )
            detector.calibration_ = parts
            threshold, tie = (_from_json(calibration[key]) for key in ("threshold", "tie_break_threshold"))
            per_class = checks.boolean("per_class", calibration["per_class"])
            detector._set_thresholds(check_fpr(calibration["fpr"]), per_class, threshold, tie)
        return detector

    # ---------------------------------------------------------------------------------------- internals
    def _scored(self, x: object) -> Parts:
        self._check_fitted()
        x = check_batch(x, input_shape=self.input_shape_)
        with self.classifier.evaluating():
            return self._parts(x)

    def _thresholds(
        self, calibration: Mapping[str, np.ndarray], fpr: float, per_class: bool
    ) -> tuple[Threshold, Threshold | None]:
        if per_class and "class" not in calibration:
            raise ValueError(
                "per-class thresholds need the classes of the calibration samples: calibrate again"
            )
        return thresholds_at_fpr(
            calibration["score"],
            fpr,
            tie_breaks=calibration.get("tie_break"),
            classes=calibration["class"] if per_class else None,
            n_classes=self.n_classes_,
        )

    def _set_thresholds(
        self, fpr: float, per_class: bool, threshold: Threshold, tie_break_threshold: Threshold | None
    ) -> None:
        if per_class and np.shape(threshold) != (self.n_classes_,):
            raise ValueError(
                f"per-class thresholds must be shaped ({self.n_classes_},); got {np.shape(threshold)}"
            )
        self.threshold_, self.tie_break_threshold_ = threshold, tie_break_threshold
        self.fpr_, self.per_class_ = fpr, per_class

    def _per_class(self, per_class: bool | None) -> bool:
        return self.per_class_default if per_class is None else checks.boolean("per_class", per_class)

    def _check_fitted(self) -> None:
        if not hasattr(self, "input_shape_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(x, y) first")

    def _check_calibrated(self) -> None:
        self._check_fitted()
        if not hasattr(self, "threshold_"):
            raise NotFittedError(
                f"this {type(self).__name__} is fitted but not calibrated yet: call calibrate(x_clean) first"
            )


def _to_json(threshold: Threshold | None) -> float | list[float] | None:
    return threshold if threshold is None or isinstance(threshold, float) else np.asarray(threshold).tolist()


def _from_json(value: object) -> Threshold | None:
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, list):
        return np.array(value, dtype=np.float64)
    return checks.finite_number("threshold", value)
