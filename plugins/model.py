"""``Classifier``: one validated value for a torch module and what it takes to call it right.

A classifier is its module, the raw inputs' ``bounds``, the ``preprocessing`` (mean, std) between raw
inputs and the module, and the module's dtype and device. Every plugin (relevance, attacks, detectors)
takes one, or a plain module that it wraps with :meth:`Classifier.wrap`; each adapter's job is "library
model -> Classifier". Checked once, here: a module, finite bounds with low < high, a finite mean and a
positive finite std given as scalars or one value per channel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checks
from .checks import check_bounds
from .modes import eval_mode

#: (mean, std) as float64 tensors; each a scalar, one value per channel, or shaped (1, C, ...).
Preprocessing = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Classifier:
    """A torch module returning logits for ``(x - mean) / std``, with raw inputs in ``bounds``.

    ``logits(x)`` takes raw inputs (any float dtype, the module's device) and is differentiable;
    ``normalize(x)`` is the preprocessing alone; ``evaluating()`` puts the module in eval mode for a
    block and restores every submodule's own flag after, even on error. The module is the caller's:
    nothing here changes its parameters, buffers or hooks.
    """

    module: nn.Module
    bounds: tuple[float, float] = (0.0, 1.0)
    preprocessing: Preprocessing | None = None
    _shaped: dict[tuple[int, int, str], Preprocessing] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        checks.module("model", self.module)
        object.__setattr__(self, "bounds", check_bounds(self.bounds))
        object.__setattr__(self, "preprocessing", check_preprocessing(self.preprocessing))

    @classmethod
    def wrap(cls, model: object, *, bounds: object = None, preprocessing: object = None) -> Classifier:
        """``model`` as a Classifier: a plain module with ``bounds`` (default (0, 1)) and ``preprocessing``,
        or a Classifier as it is (then neither may be given: it already says them)."""
        if isinstance(model, Classifier):
            if bounds is not None or preprocessing is not None:
                raise ValueError(
                    "bounds/preprocessing: a Classifier already holds them; give a plain module or leave "
                    "them out"
                )
            return model
        return cls(model, (0.0, 1.0) if bounds is None else bounds, preprocessing)  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype:
        """The module's floating dtype (float32 when it has no floating parameter): inputs are cast to it."""
        return next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live (CPU when it has none)."""
        return next((p.device for p in self.module.parameters()), torch.device("cpu"))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs mapped to the module's input space, ``(x - mean) / std`` in x's dtype."""
        if self.preprocessing is None:
            return x
        mean, std = self._shaped_for(x)
        return (x - mean.to(x.dtype)) / std.to(x.dtype)

    def std_for(self, like: torch.Tensor) -> torch.Tensor | None:
        """The std shaped to broadcast over ``like`` (None without preprocessing): a gradient w.r.t. the
        normalized input divided by it is the gradient w.r.t. the raw input (chain rule)."""
        return None if self.preprocessing is None else self._shaped_for(like)[1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on raw ``x`` (normalized, cast to the module's dtype); one tensor, checked."""
        return checks.as_output(self.module(self.normalize(x).to(self.dtype)))

    @contextmanager
    def evaluating(self) -> Iterator[Classifier]:
        """The module in eval mode for the block; each submodule's train/eval flag restored after."""
        with eval_mode(self.module):
            yield self

    def _shaped_for(self, x: torch.Tensor) -> Preprocessing:
        """(mean, std) shaped to broadcast over ``x``'s channel axis 1, on its device (cached)."""
        key = (x.dim(), x.shape[1] if x.dim() > 1 else 0, str(x.device))
        if key not in self._shaped:
            mean, std = self.preprocessing or (torch.zeros(()), torch.ones(()))
            self._shaped[key] = (shape_per_channel(mean, x, "mean"), shape_per_channel(std, x, "std"))
        return self._shaped[key]


def check_preprocessing(preprocessing: object) -> Preprocessing | None:
    """``None``, or ``(mean, std)`` as float64 tensors: finite, std > 0; scalars, sequences or arrays."""
    if preprocessing is None:
        return None
    if not isinstance(preprocessing, (tuple, list)) or len(preprocessing) != 2:
        raise ValueError(f"preprocessing must be None or a pair (mean, std); got {preprocessing!r}")
    mean, std = (_as_float64(value, name) for value, name in zip(preprocessing, ("mean", "std"), strict=True))
    if not bool(torch.all(std > 0)):
        raise ValueError("preprocessing std must be positive everywhere")
    return mean, std


def _as_float64(value: object, name: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"preprocessing {name} must be a number or numbers; got {value!r}") from None
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"preprocessing {name} must be finite")
    return tensor.cpu()


def shape_per_channel(value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` (a scalar, one value per channel, or shaped (1, ...) like a sample) shaped to broadcast
    against ``like`` (N, C, ...) over channel axis 1, on ``like``'s device."""
    tensor = value.to(like.device)
    if tensor.dim() == like.dim() and tensor.shape[0] == 1 and _broadcasts(tensor.shape, like.shape):
        return tensor
    flat = tensor.flatten()
    if flat.numel() == 1:
        return flat.reshape([1] * like.dim())
    if like.dim() >= 2 and flat.numel() == like.shape[1]:
        return flat.reshape([1, flat.numel()] + [1] * (like.dim() - 2))
    channels = like.shape[1] if like.dim() >= 2 else 1
    raise ValueError(
        f"preprocessing {name} must be a scalar or one value per channel ({channels}); "
        f"got {flat.numel()} values"
    )


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    return all(size in (1, full) for size, full in zip(shape[1:], target[1:], strict=True))
