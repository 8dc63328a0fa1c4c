"""What a detector reads from inside a network: layer outputs or inputs by layer name, via forward hooks.

The hooks live only inside :meth:`FeatureExtractor.capturing` (a context manager that removes them and
restores every module's train/eval flag, even after an exception). With ``detach=False`` the captured
tensors keep their graph, so later work can differentiate through a detector's features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from . import checks
from .modes import eval_mode

Capture = Literal["output", "input"]


def layer_names(model: nn.Module) -> list[str]:
    """Names of every submodule, as ``model.named_modules()`` gives them (the root, '', excluded)."""
    return [name for name, _ in model.named_modules() if name]


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise a ValueError listing the model's layers when a name in ``layers`` does not exist."""
    known = set(layer_names(model))
    missing = [name for name in layers if name not in known]
    if missing:
        raise ValueError(
            f"layer(s) {missing} not in the model; its layers are: {', '.join(layer_names(model))}"
        )


def last_layer_of_type(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> str:
    """Name of the last submodule of ``kind`` in registration order (e.g. the last Linear or Conv2d)."""
    names = [name for name, module in model.named_modules() if name and isinstance(module, kind)]
    if not names:
        raise ValueError(
            f"the model has no layer of type {kind}; its layers are: {', '.join(layer_names(model))}"
        )
    return names[-1]


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the model's first floating parameter (``default`` when it has none): inputs are cast
    to it before the forward pass."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Feature vectors (N, D): convolutional maps (N, C, H, W) globally average-pooled, others flattened."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    return features.flatten(1)


class FeatureExtractor:
    """Captures the outputs (or inputs) of named layers during a forward pass.

    ``FeatureExtractor(model, ["features.8"])(x)`` returns ``{"features.8": tensor}``; inside
    ``with extractor.capturing() as captured: model(x)`` the dict fills as the model runs.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, capture: Capture = "output") -> None:
        checks.module("model", model)
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of layer names; got {layers!r}")
        checks.one_of("capture", capture, ("output", "input"))
        check_layers(model, layers)
        self.model = model
        self.layers = tuple(layers)
        self.capture = capture

    @contextmanager
    def capturing(self, *, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Register one forward hook per layer; yield the dict they fill; remove them on exit."""
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        handles = []

        def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                value = inputs[0] if self.capture == "input" else output
                captured[name] = value.detach() if detach else value

            return hook

        try:
            for name in self.layers:
                handles.append(modules[name].register_forward_hook(hook_for(name)))
            with eval_mode(self.model):
                yield captured
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, x: torch.Tensor, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Captured features of x, computed without gradients in mini-batches and concatenated."""
        batch_size = checks.positive_int("batch_size", batch_size)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        with self.capturing() as captured, torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                self.model(x[start : start + batch_size])
                for name in self.layers:
                    parts[name].append(captured.pop(name))
        if x.shape[0] == 0:
            return {name: torch.empty(0) for name in self.layers}
        return {name: torch.cat(values) for name, values in parts.items()}
