"""Input validation shared by attacks and detectors: clear errors that name the argument, before any work."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn


def check_inputs(x: object, bounds: tuple[float, float], *, name: str = "x") -> torch.Tensor:
    """Return ``x`` as a floating tensor after checking it is finite and inside ``bounds``.

    Values up to 1e-6 of the range outside the bounds (float rounding in the caller's pipeline) pass;
    the attacks clamp their working copy into the bounds. The caller's tensor is never modified; a
    non-floating tensor is refused rather than silently cast.
    """
    low, high = check_bounds(bounds)
    x = check_batch(x, name=name)
    if x.numel() == 0:
        return x
    tolerance = 1e-6 * (high - low)
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < low - tolerance or x_max > high + tolerance:
        raise ValueError(
            f"{name} has values in [{x_min:.6g}, {x_max:.6g}], outside the bounds [{low}, {high}]"
        )
    return x


def check_batch(x: object, *, name: str = "x", input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` after checking it is a finite floating-point batch (N, ...), shaped like ``input_shape``
    per sample when given (the shape a detector was fitted on)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch shaped (N, ...) with N first; got shape {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        expected = ", ".join(map(str, input_shape))
        raise ValueError(f"{name} must be shaped (N, {expected}) as in fit; got {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def check_bounds(bounds: object) -> tuple[float, float]:
    """``bounds`` as a float pair (low, high) with low < high, both finite."""
    if isinstance(bounds, (str, bytes)):
        raise ValueError(f"bounds must be a pair (low, high); got {bounds!r}")
    try:
        low, high = (float(value) for value in bounds)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (low, high); got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"bounds must be finite with low < high; got ({low}, {high})")
    return low, high


def check_labels(
    y: object, n_samples: int, n_classes: int | None, device: torch.device, *, name: str = "y"
) -> torch.Tensor:
    """Class indices (N,) from labels given as (N,), (N, 1) or one-hot (N, K) arrays or tensors.

    Refuses non-integer values, negatives, indices >= ``n_classes``, a wrong count and malformed one-hot rows.
    ``n_classes=None`` (the count is not known before the model's first forward) runs every check but the
    two that need it, the upper index bound and the one-hot width: call again once the count is known.
    """
    labels = torch.as_tensor(y.copy() if hasattr(y, "copy") and not isinstance(y, torch.Tensor) else y)
    width = labels.shape[1] if labels.dim() == 2 else 0
    if width == 1:
        labels = labels[:, 0]
    elif width > 1 and width == (n_classes or width):
        labels = _from_one_hot(labels, name)
    if labels.dim() != 1 or labels.shape[0] != n_samples:
        forms = f"(N,), (N, 1) or one-hot (N, {n_classes or 'K'})"
        raise ValueError(f"{name} must be {n_samples} labels shaped {forms}; got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices; got booleans")
    if labels.is_floating_point():
        if not bool(torch.all(labels == labels.round())):
            raise ValueError(f"{name} must hold integer class indices; got non-integer values")
        labels = labels.long()
    if not labels.numel():
        return labels.long().to(device)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (n_classes is not None and high >= n_classes):
        expected = f"in [0, {n_classes - 1}]" if n_classes is not None else ">= 0"
        raise ValueError(f"{name} must hold class indices {expected}; got values in [{low}, {high}]")
    return labels.long().to(device)


def _from_one_hot(labels: torch.Tensor, name: str) -> torch.Tensor:
    is_binary = bool(torch.all((labels == 0) | (labels == 1)))
    if not is_binary or not bool(torch.all(labels.sum(1) == 1)):
        raise ValueError(f"{name} given as (N, K) must be one-hot: one 1 per row and 0 elsewhere")
    return labels.argmax(1)


def as_output(output: object) -> torch.Tensor:
    """The model's output after checking it is one tensor (the logits, for a classifier)."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model must return one tensor (logits shaped (N, classes)); it returned a "
            f"{type(output).__name__}. Wrap it in a module whose forward returns the logits."
        )
    return output


def looks_like_probabilities(outputs: torch.Tensor) -> bool:
    """True when every output row is non-negative and sums to one: the model ends in a softmax.

    A batch of one class's outputs (N, 1) is never taken for probabilities; the sums are checked in
    float64 to 1e-4, looser than float32 rounding of a softmax over thousands of classes.
    """
    if outputs.dim() != 2 or outputs.shape[1] < 2 or outputs.numel() == 0:
        return False
    rows = outputs.detach().double()
    return bool((rows >= 0).all()) and bool(((rows.sum(1) - 1).abs() <= 1e-4).all())


# ---------------------------------------------------------------------------------------------------------
# parameters: one check each, the message naming the parameter and what was expected. numpy scalars pass as
# the Python numbers they hold; bools are refused where a number is expected (True is an int in Python).


def positive_int(name: str, value: object) -> int:
    """``value`` as an int > 0, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be an int > 0; got {value!r}")
    return int(value)


def natural_int(name: str, value: object) -> int:
    """``value`` as an int >= 0, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    return int(value)


def integer(name: str, value: object) -> int:
    """``value`` as an int (a seed, say), or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int; got {value!r}")
    return int(value)


def finite_number(name: str, value: object, *, low: float = -math.inf, low_open: bool = False) -> float:
    """``value`` as a finite float >= ``low`` (> ``low`` when ``low_open``), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}; got {value!r}")
    return float(value)


def open_fraction(name: str, value: object) -> float:
    """``value`` as a float in the open interval (0, 1) (a rate, a share), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1); got {value!r}")
    return float(value)


def boolean(name: str, value: object) -> bool:
    """``value`` if it is a bool, or a ValueError naming ``name`` (0 and 1 are not taken for flags)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool; got {value!r}")
    return value


def one_of(name: str, value: object, choices: Sequence[object]) -> object:
    """``value`` if it is one of ``choices``, or a ValueError naming ``name`` and listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def module(name: str, value: object) -> nn.Module:
    """``value`` if it is a torch module, or a TypeError naming ``name``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(value).__name__}")
    return value


def unknown_keys(name: str, given: object, valid: Sequence[str]) -> None:
    """A TypeError naming the keywords of ``given`` (a mapping) that ``name`` does not take."""
    unknown = sorted(set(given) - set(valid))  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"unknown parameter(s) {unknown} for {name}; valid: {sorted(valid)}")
