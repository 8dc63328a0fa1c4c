"""Per-iteration attack curves: ASR and L-norms over iterations, L-norm over ASR (thesis Figs. 4.6-4.10).

Our attacks record an :class:`~xaiadv.plugins.attacks.AttackTrace` themselves (``trace=True``); ART, Foolbox
and torchattacks have no callbacks, so :class:`IterateRecorder` wraps the model and records every iterate
the library feeds it. Both give an :class:`IterateRecord` (success and norms per point and sample), and
:func:`summarize` turns one into an :class:`AttackCurve`, the thesis's ASR (eq. 4.15) per point.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from xaiadv.plugins.attacks import AttackTrace
from xaiadv.plugins.modes import eval_mode
from xaiadv.plugins.relevance import as_preprocessing

from .metrics import perturbation_norms

NORMS = ("L0", "L1", "L2", "Linf")


@dataclass(frozen=True)
class IterateRecord:
    """What an attack did at each point t, per sample: success (T, N) bool, prediction != y at point t;
    ``norms[k]`` (T, N) float64, the L0/L1/L2/Linf norm of x_t - x_orig (as :func:`perturbation_norms`)."""

    success: np.ndarray
    norms: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if not isinstance(self.success, np.ndarray) or self.success.dtype != bool or self.success.ndim != 2:
            raise ValueError("success must be a bool numpy array shaped (points, samples)")
        if not isinstance(self.norms, dict) or sorted(self.norms) != sorted(NORMS):
            raise ValueError(f"norms must be a dict with exactly the keys {', '.join(NORMS)}")
        for key, values in self.norms.items():
            valid = isinstance(values, np.ndarray) and values.dtype == np.float64
            if not valid or values.shape != self.success.shape:
                raise ValueError(
                    f"norms[{key!r}] must be a float64 array shaped like success {self.success.shape}"
                )


def _as_float64(x: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy on the CPU: shares no memory with x, so it keeps no tensor alive."""
    return x.detach().to(device="cpu", dtype=torch.float64, copy=True).numpy()


def _fingerprint(x: np.ndarray) -> bytes:
    """Identity of one batch of points by value (dtype-free: the float64 values), for :meth:`end_at`."""
    return hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()


class IterateRecorder(nn.Module):
    """``model`` with a memory: given to an attack library, it records each iterate the library feeds it.

    ``forward(x)`` is ``model(x)`` (the same graph; gradients flow). Inside :meth:`recording` every call whose
    input has the recorded batch's exact shape adds one point: success (argmax of the logits != y) and the
    norms of x - x_orig, computed detached. Other shapes (class-count probes, ART's (1, ...) check) are
    skipped. Point k is the k-th full-batch forward. For gradient-sign attacks that is the iterate after k
    steps (point 0 the start, or the random start), and library bookkeeping follows the last step:

    - torchattacks PGD: ``steps`` points, iterates 0..steps-1; the returned x_adv is never evaluated.
    - Foolbox LinfPGD: ``steps + 1`` points, iterates 0..steps; the last is its final check of the result.
    - ART BIM/PGD: ``max_iter + 2``: iterates 0..max_iter, then the clean batch (for its logged success rate).

    :meth:`end_at` with the returned x_adv makes the last point the attack's result in all three.

    A wrapper rather than a forward hook: ART's PyTorchClassifier runs an ``nn.Sequential`` child by child,
    so a hook on the caller's model would never fire, while this module (not a Sequential) has its forward
    called by ART, Foolbox and torchattacks alike; and nothing is attached to the caller's model.
    ``preprocessing=(mean, std)`` is applied inside, so build the attack with ``preprocessing=None`` and
    the recorder sees, and measures, raw inputs. Its own ``training`` flag starts as the model's, because
    torchattacks saves and restores ``model.training`` around an attack; ``.eval()``/``.train()`` reach the
    model as for any submodule. Nothing but the numpy record outlives a recording.
    """

    def __init__(self, model: nn.Module, *, preprocessing: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.training = model.training
        self._x_orig: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._points: list[tuple[np.ndarray, dict[str, np.ndarray], bytes]] = []
        self._record: IterateRecord | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, normalization = x, as_preprocessing(self.preprocessing, x)
        if normalization is not None:
            inputs = (x - normalization[0].to(x.dtype)) / normalization[1].to(x.dtype)
        logits = self.model(inputs)
        if self._x_orig is not None and tuple(x.shape) == self._x_orig.shape:
            self._add_point(x, logits)
        return logits

    def _add_point(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        points = _as_float64(x)
        success = logits.detach().argmax(1).cpu().numpy() != self._y
        self._points.append((success, perturbation_norms(self._x_orig, points), _fingerprint(points)))

    @contextmanager
    def recording(self, x_orig: torch.Tensor, y: torch.Tensor) -> Iterator[IterateRecorder]:
        """Record the full-batch forwards of one attack on (x_orig (N, ...), y (N,) class indices).

        On a clean exit :attr:`record` holds the points; after an exception there is none.
        """
        if not isinstance(x_orig, torch.Tensor) or x_orig.dim() < 2:
            raise TypeError("x_orig must be a torch.Tensor batch shaped (N, ...)")
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError("y must be a torch.Tensor of integer class indices")
        if tuple(y.shape) != (x_orig.shape[0],):
            raise ValueError(
                f"y must hold one class index per sample of x_orig: shape ({x_orig.shape[0]},); "
                f"got {tuple(y.shape)}"
            )
        if self._x_orig is not None:
            raise RuntimeError("this recorder is already recording; recordings cannot nest")
        as_preprocessing(self.preprocessing, x_orig)  # a bad preprocessing fails here, before the attack
        self._record = None
        self._x_orig, self._y = _as_float64(x_orig), y.detach().cpu().numpy().astype(np.int64)
        try:
            yield self
            self._record = self._collect()
        finally:
            self._x_orig, self._y, self._points = None, None, []

    def end_at(self, x_adv: torch.Tensor) -> None:
        """End the record at the attack's result: points after the last one equal to x_adv are dropped (ART's
        clean re-prediction); x_adv is added, in eval mode, when no point equals it (torchattacks PGD)."""
        if self._x_orig is None:
            raise RuntimeError("end_at must be called inside recording()")
        if not isinstance(x_adv, torch.Tensor) or tuple(x_adv.shape) != self._x_orig.shape:
            raise ValueError(f"x_adv must be a torch.Tensor shaped like x_orig {self._x_orig.shape}")
        fingerprint = _fingerprint(_as_float64(x_adv))
        equal = [k for k, point in enumerate(self._points) if point[2] == fingerprint]
        if equal:
            del self._points[equal[-1] + 1 :]
            return
        with torch.no_grad(), eval_mode(self.model):
            self(x_adv)

    def _collect(self) -> IterateRecord:
        n_samples = self._x_orig.shape[0]
        if not self._points:
            empty = np.zeros((0, n_samples))
            return IterateRecord(empty.astype(bool), {key: empty.copy() for key in NORMS})
        success = np.stack([point[0] for point in self._points])
        return IterateRecord(
            success, {key: np.stack([point[1][key] for point in self._points]) for key in NORMS}
        )

    @property
    def record(self) -> IterateRecord:
        """The points of the last completed :meth:`recording`."""
        if self._record is None:
            raise RuntimeError("no completed recording: run the attack inside recorder.recording(x, y)")
        return self._record


def record_from_trace(trace: AttackTrace) -> IterateRecord:
    """The IterateRecord of one of our attacks' traces (rows 0..max_iter = after t steps, one column per
    sample; samples stopped early keep their final values)."""
    if not isinstance(trace, AttackTrace):
        raise TypeError(f"trace must be an AttackTrace (built with trace=True); got {type(trace).__name__}")
    norms = {key: _as_float64(getattr(trace, key.lower())) for key in NORMS}
    return IterateRecord(trace.success.detach().cpu().numpy().astype(bool), norms)


def _pad(values: np.ndarray, n_points: int, index: int) -> np.ndarray:
    """Repeat the last point until there are ``n_points``: a batch that stopped keeps its final state."""
    if values.shape[0] == n_points:
        return values
    if values.shape[1] == 0:
        return np.zeros((n_points, 0), values.dtype)
    if values.shape[0] == 0:
        raise ValueError(f"records[{index}] has no points to pad to {n_points}: was the attack recorded?")
    return np.concatenate([values, np.repeat(values[-1:], n_points - values.shape[0], axis=0)])


def concat_records(records: Sequence[IterateRecord]) -> IterateRecord:
    """Join mini-batch records along the samples. Batches may differ in points (early stop, another number
    of calls): each shorter one is padded with its last point, since a batch that stopped keeps its state."""
    records = list(records)
    if not records or not all(isinstance(record, IterateRecord) for record in records):
        raise ValueError("records must be a non-empty sequence of IterateRecord")
    n_points = max(record.success.shape[0] for record in records)

    def joined(pick: Any) -> np.ndarray:
        return np.concatenate([_pad(pick(record), n_points, i) for i, record in enumerate(records)], axis=1)

    return IterateRecord(
        joined(lambda record: record.success),
        {key: joined(lambda record, key=key: record.norms[key]) for key in NORMS},
    )


@dataclass(frozen=True)
class AttackCurve:
    """One attack's curves over points t: iteration (T,) int, asr (T,) (thesis eq. 4.15 at each point) and
    ``norms[k]`` (T,), the mean norm over the initially correct samples successful at t (NaN where none)."""

    iteration: np.ndarray
    asr: np.ndarray
    norms: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if self.iteration.ndim != 1 or self.asr.shape != self.iteration.shape:
            raise ValueError("iteration and asr must be 1-D arrays of the same length")
        if sorted(self.norms) != sorted(NORMS) or any(v.shape != self.asr.shape for v in self.norms.values()):
            raise ValueError(f"norms must hold exactly {', '.join(NORMS)}, each shaped like asr")

    def to_dict(self) -> dict[str, list]:
        """JSON-ready lists under "iteration", "asr", "L0", "L1", "L2", "Linf"; NaN becomes None."""

        def floats(values: np.ndarray) -> list[float | None]:
            return [None if math.isnan(value) else value for value in values.tolist()]

        return {
            "iteration": self.iteration.tolist(),
            "asr": floats(self.asr),
            **{key: floats(self.norms[key]) for key in NORMS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> AttackCurve:
        """The inverse of :meth:`to_dict` (None becomes NaN)."""
        keys = ("iteration", "asr", *NORMS)
        if not isinstance(data, dict) or sorted(data) != sorted(keys):
            raise ValueError(f"data must be a dict with exactly the keys {', '.join(keys)}")

        def floats(values: list) -> np.ndarray:
            return np.array([math.nan if value is None else value for value in values], dtype=np.float64)

        return cls(
            np.asarray(data["iteration"], dtype=np.int64),
            floats(data["asr"]),
            {key: floats(data[key]) for key in NORMS},
        )


def summarize(record: IterateRecord, initially_correct: np.ndarray) -> AttackCurve:
    """ASR and mean norms per point over the initially correct samples (bool (N,)); thesis eq. 4.15 per point.

    Initially misclassified samples are left out, as in :func:`.metrics.attack_success_rate`; the norms
    average the samples successful at that point, so they show what success cost by then.
    """
    if not isinstance(record, IterateRecord):
        raise TypeError(f"record must be an IterateRecord; got {type(record).__name__}")
    correct = np.asarray(initially_correct)
    if correct.dtype != bool:
        raise TypeError(f"initially_correct must be a bool array; got dtype {correct.dtype}")
    if correct.shape != (record.success.shape[1],):
        raise ValueError(
            f"initially_correct must have one entry per sample: shape ({record.success.shape[1]},); "
            f"got {correct.shape}"
        )
    n_points = record.success.shape[0]
    counted = record.success & correct
    n_success = counted.sum(1)
    nan = np.full(n_points, math.nan)
    asr = n_success / correct.sum() if correct.any() else nan
    norms = {
        key: np.divide(np.where(counted, values, 0.0).sum(1), n_success, out=nan.copy(), where=n_success > 0)
        for key, values in record.norms.items()
    }
    return AttackCurve(np.arange(n_points), asr, norms)
