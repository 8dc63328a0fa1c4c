"""Faster LRP rules for Conv2d and Linear, plugged into Zennit's composites as hooks.

Zennit's stock rules (``zennit.rules``) recompute each layer's forward under modified parameters and
differentiate it with autograd inside the backward hook: two to four extra forwards and backwards per
layer. These hooks compute the same relevance in closed form (one forward with modified weights where
the rule needs it, one transposed convolution per term) and skip the terms that vanish, such as the
negative-input half of z+ and alpha-beta behind a ReLU. tests/plugins/test_rules.py proves each equal to
the stock rule in float64. Rule names and equations follow Zennit and the thesis (eqs. 2.23, 2.25).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
)
from zennit.core import Composite, Hook, RemovableHandle, RemovableHandleList

DEFAULT_STABILIZER = 1e-6
Layer = nn.Conv2d | nn.Linear


def _layer_forward(
    module: Layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if module.padding_mode != "zeros":
        raise ValueError(f"fast LRP rules support zero padding only; {module} uses {module.padding_mode!r}")
    return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def _layer_transpose(
    module: Layer, input_shape: torch.Size, weight: torch.Tensor, signal: torch.Tensor
) -> torch.Tensor:
    """The input-gradient of the layer with ``weight``: W^T signal (a transposed convolution for Conv2d).

    For the common stride-1, ungrouped convolution the transposed convolution is computed as a forward
    convolution with the kernel flipped and its channel axes swapped, padded by d (k - 1) - p: the same
    numbers, but oneDNN's forward kernels run it 10-40% faster than its backward-data kernels.
    """
    if isinstance(module, nn.Linear):
        return signal @ weight
    padding = _symmetric_padding(module)
    if padding is None:  # "same" padding that is uneven on the two sides: let autograd transpose it
        return _transpose_by_autograd(module, input_shape, weight, signal)
    flipped_padding = tuple(
        d * (k - 1) - p for d, k, p in zip(module.dilation, module.kernel_size, padding, strict=True)
    )
    if module.groups == 1 and set(module.stride) == {1} and min(flipped_padding) >= 0:
        kernel = weight.flip(2, 3).transpose(0, 1).contiguous()
        return F.conv2d(signal, kernel, None, 1, flipped_padding, module.dilation, 1)
    return torch.nn.grad.conv2d_input(
        input_shape, weight, signal, module.stride, padding, module.dilation, module.groups
    )


def _symmetric_padding(module: nn.Conv2d) -> tuple[int, ...] | None:
    """The layer's padding per side as integers ("valid" is 0, "same" half of d (k - 1)), or None where
    "same" pads the two sides of a dimension unevenly."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    return tuple(total // 2 for total in totals) if all(total % 2 == 0 for total in totals) else None


def _transpose_by_autograd(
    module: nn.Conv2d, input_shape: torch.Size, weight: torch.Tensor, signal: torch.Tensor
) -> torch.Tensor:
    """W^T signal as autograd's input gradient of the layer's forward (one forward more, any padding)."""
    with torch.enable_grad():
        probe = torch.zeros(input_shape, dtype=signal.dtype, device=signal.device, requires_grad=True)
        output = _layer_forward(module, probe, weight.detach(), None)
        (gradient,) = torch.autograd.grad(output, probe, signal)
    return gradient


def _positive_bias(module: Layer) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.clamp(min=0)


def _negative_bias(module: Layer) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.clamp(max=0)


class _RuleNode(torch.autograd.Function):
    """Identity on the layer's output whose backward is the rule's relevance (hook active) or the true
    input gradient W^T g (hook inactive). Autograd never runs the layer's own backward behind it."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, output: list[torch.Tensor], hook: FastRule, module: Layer
    ) -> torch.Tensor:
        """``output`` arrives in a list so autograd does not take it for an input: the result is then a
        fresh output of this node, which an in-place ReLU after the layer may modify (no copy needed)."""
        ctx.save_for_backward(x)
        ctx.hook, ctx.module = hook, module
        return output[0]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        module = ctx.module
        if ctx.hook.active:
            grad = ctx.hook.relevance(module, x, grad_output)
        else:
            grad = _layer_transpose(module, x.shape, module.weight, grad_output)
        return grad, None, None, None


class _RoutingHook(Hook, metaclass=ABCMeta):
    """A Zennit hook that routes its module's output through one autograd node of its own (``_node``),
    given the module's input x and its detached output. Inputs that need no gradient pass untouched, and so
    does an in-place module, whose input its output has overwritten."""

    def register(self, module: nn.Module) -> RemovableHandleList:
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self._route)])

    def _route(
        self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        x = input[0]
        if not x.requires_grad or getattr(module, "inplace", False):
            return output
        return self._node(module, x, output.detach())

    @abstractmethod
    def _node(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The module's output as a fresh output of this hook's autograd node."""


class FastRule(_RoutingHook):
    """A Zennit hook whose backward is :meth:`relevance`, computed in closed form from the layer's input.

    Unlike Zennit's hooks, which let autograd run the layer's own backward and then replace its result,
    the layer's output is routed through one autograd node that computes either the relevance or, inside
    ``composite.inactive()``, the true input gradient: no backward is computed only to be thrown away.
    Parameter gradients do not flow through a hooked layer (attacks and detectors never need them).
    Subclasses implement ``relevance(module, x, relevance_out)``; ``stabilizer`` is Zennit's (added with
    the sign of the denominator, +1 for 0).
    """

    def __init__(self, stabilizer: float = DEFAULT_STABILIZER) -> None:
        super().__init__()
        self.stabilizer = float(stabilizer)

    def _node(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return _RuleNode.apply(x, [output], self, module)

    @abstractmethod
    def relevance(self, module: Layer, x: torch.Tensor, relevance_out: torch.Tensor) -> torch.Tensor:
        """R_in of the layer's input ``x`` given the relevance of its output (the rule's equation)."""

    def copy(self) -> FastRule:
        return type(self)(**self._params())

    def _params(self) -> dict[str, Any]:
        return {"stabilizer": self.stabilizer}

    def _ratio(self, relevance_out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """R / (z + eps sign(z)) with sign(0) = +1: Zennit's ``stabilize`` in one expression."""
        return relevance_out / torch.where(z >= 0, z + self.stabilizer, z - self.stabilizer)

    def _ratio_nonnegative(self, relevance_out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The same for a z known to be >= 0 (or -0.0), where Zennit's stabilizer is z + eps.

        z must be a temporary of the caller: it is overwritten with the result (no extra allocation).
        """
        return torch.div(relevance_out, z.add_(self.stabilizer), out=z)


class FastEpsilon(FastRule):
    """LRP-epsilon (eq. 2.23): R_in = x * W^T (R / (z + eps sign(z))), z the layer's own output."""

    def relevance(self, module: Layer, x: torch.Tensor, relevance_out: torch.Tensor) -> torch.Tensor:
        z = _layer_forward(module, x, module.weight, module.bias)
        return x * _layer_transpose(module, x.shape, module.weight, self._ratio(relevance_out, z))


class FastZPlus(FastRule):
    """LRP-z+ as Zennit's ZPlus: z = W+ x+ + b+ + W- x-; R_in = x+ W+^T s + x- W-^T s, s = R / z.

    The x- terms are skipped when the input has no negative value (any layer behind a ReLU).
    """

    def relevance(self, module: Layer, x: torch.Tensor, relevance_out: torch.Tensor) -> torch.Tensor:
        w_pos, w_neg = module.weight.clamp(min=0), module.weight.clamp(max=0)
        has_negative = bool(x.min() < 0)
        x_pos = x.clamp(min=0) if has_negative else x
        z = _layer_forward(module, x_pos, w_pos, _positive_bias(module))
        if has_negative:
            z = z + _layer_forward(module, x.clamp(max=0), w_neg, None)
        signal = self._ratio_nonnegative(relevance_out, z)  # z+ >= 0: nonnegative inputs times weights
        relevance = _layer_transpose(module, x.shape, w_pos, signal).mul_(x_pos)
        if has_negative:
            relevance += _layer_transpose(module, x.shape, w_neg, signal).mul_(x.clamp(max=0))
        return relevance


class FastAlphaBeta(FastRule):
    """LRP-alpha-beta (eq. 2.25) as Zennit's AlphaBeta, alpha - beta = 1.

    Positive part z+ = W+ x+ + b+ + W- x-, negative part z- = W- x+ + b- + W+ x-;
    R_in = alpha (x+ W+^T s+ + x- W-^T s+) - beta (x+ W-^T s- + x- W+^T s-). x- terms skipped when x >= 0.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = DEFAULT_STABILIZER) -> None:
        if alpha < 0 or beta < 0 or alpha - beta != 1.0:
            raise ValueError(f"alpha and beta must be >= 0 with alpha - beta = 1; got {alpha}, {beta}")
        super().__init__(stabilizer)
        self.alpha, self.beta = float(alpha), float(beta)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "stabilizer": self.stabilizer}

    def relevance(self, module: Layer, x: torch.Tensor, relevance_out: torch.Tensor) -> torch.Tensor:
        w_pos, w_neg = module.weight.clamp(min=0), module.weight.clamp(max=0)
        has_negative = bool(x.min() < 0)
        x_pos = x.clamp(min=0) if has_negative else x
        x_neg = x.clamp(max=0)
        parts = []
        for w_same, w_other, bias in (
            (w_pos, w_neg, _positive_bias(module)),
            (w_neg, w_pos, _negative_bias(module)),
        ):
            z = _layer_forward(module, x_pos, w_same, bias)
            if has_negative:
                z = z + _layer_forward(module, x_neg, w_other, None)
            signal = self._ratio(relevance_out, z)
            part = x_pos * _layer_transpose(module, x.shape, w_same, signal)
            if has_negative:
                part = part + x_neg * _layer_transpose(module, x.shape, w_other, signal)
            parts.append(part)
        return self.alpha * parts[0] - self.beta * parts[1]


class FastFlat(FastRule):
    """LRP-flat as Zennit's Flat: all weights and inputs one, no bias; R_in = 1^T (R / z_flat).

    z_flat depends only on the shapes, so it is computed once per input shape and reused.
    """

    def __init__(self, stabilizer: float = DEFAULT_STABILIZER) -> None:
        super().__init__(stabilizer)
        self._denominator: dict[tuple[Any, ...], torch.Tensor] = {}

    def relevance(self, module: Layer, x: torch.Tensor, relevance_out: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(module.weight)
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._denominator:  # stabilized once: z_flat >= 0, so Zennit's denominator is z + eps
            self._denominator[key] = (
                _layer_forward(module, torch.ones_like(x[:1]), ones, None) + self.stabilizer
            )
        denominator = self._denominator[key]
        if getattr(module, "groups", 1) != 1:
            return _layer_transpose(module, x.shape, ones, relevance_out / denominator)
        # Ungrouped, every output channel has the same kernel of ones and so the same z_flat: summing the
        # output channels first and dividing once gives every input channel the same relevance at
        # 1/out_channels of the cost.
        summed = relevance_out.sum(1, keepdim=True).div_(denominator[:, :1])
        single_channel = (x.shape[0], 1, *x.shape[2:])
        return _layer_transpose(module, single_channel, ones[:1, :1], summed).expand_as(x).contiguous()


class _PassNode(torch.autograd.Function):
    """Identity on a ReLU's output whose backward passes relevance through unchanged (Zennit's Pass rule,
    hook active) or gates the true gradient with ReLU's own kernel, threshold_backward (hook inactive)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, output: list[torch.Tensor], hook: FastReLUPass) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.hook = hook
        return output[0]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.hook.active:
            return grad_output, None, None
        (x,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad_output, x, 0.0), None, None


class FastReLUPass(_RoutingHook):
    """Zennit's Pass rule for a ReLU module without its copies: the relevance pass skips the ReLU's gate.

    The gate would change nothing (a unit it closes has output 0, so the layer above gave it relevance
    x * (...) = 0); skipping it saves one kernel per ReLU per relevance pass. An in-place ReLU has already
    overwritten its input, so it keeps autograd's own gating, which gives the same relevance.
    """

    def _node(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return _PassNode.apply(x, [output], self)

    def copy(self) -> FastReLUPass:
        return FastReLUPass()


FAST_LAYERS = (nn.Conv2d, nn.Linear)

_RELU_PASS = (nn.ReLU, FastReLUPass())

#: name -> factory of the stock Zennit composite with the fast rules plugged in for Conv2d and Linear.
#: Prepended layer maps take precedence over the composite's own; other layer types keep the stock rules.
FAST_COMPOSITES: dict[str, Callable[..., Composite]] = {
    "epsilon_plus_flat": lambda canonizers, box: EpsilonPlusFlat(
        layer_map=[_RELU_PASS, (nn.Conv2d, FastZPlus()), (nn.Linear, FastEpsilon())],
        first_map=[(FAST_LAYERS, FastFlat())],
        canonizers=canonizers,
    ),
    "epsilon_plus": lambda canonizers, box: EpsilonPlus(
        layer_map=[_RELU_PASS, (nn.Conv2d, FastZPlus()), (nn.Linear, FastEpsilon())],
        canonizers=canonizers,
    ),
    "epsilon_alpha2_beta1_flat": lambda canonizers, box: EpsilonAlpha2Beta1Flat(
        layer_map=[_RELU_PASS, (nn.Conv2d, FastAlphaBeta()), (nn.Linear, FastEpsilon())],
        first_map=[(FAST_LAYERS, FastFlat())],
        canonizers=canonizers,
    ),
    "epsilon_alpha2_beta1": lambda canonizers, box: EpsilonAlpha2Beta1(
        layer_map=[_RELU_PASS, (nn.Conv2d, FastAlphaBeta()), (nn.Linear, FastEpsilon())],
        canonizers=canonizers,
    ),
    "epsilon_gamma_box": lambda canonizers, box: EpsilonGammaBox(
        low=box[0], high=box[1], layer_map=[_RELU_PASS, (nn.Linear, FastEpsilon())], canonizers=canonizers
    ),
}
