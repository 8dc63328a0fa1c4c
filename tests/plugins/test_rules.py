"""The fast closed-form rules equal Zennit's stock rules (float64 oracle), layer by layer and end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit.composites import LayerMapComposite
from zennit.rules import AlphaBeta, Epsilon, Flat, ZPlus

from xaiadv.plugins.relevance import COMPOSITE_NAMES, Relevance
from xaiadv.plugins.rules import FastAlphaBeta, FastEpsilon, FastFlat, FastZPlus


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(12, 7),
        "linear-nobias": nn.Linear(12, 7, bias=False),
        "conv": nn.Conv2d(3, 5, 3, padding=1),
        "conv-strided": nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        "conv-dilated-grouped": nn.Conv2d(4, 6, 3, dilation=2, groups=2),
        # stride 1, ungrouped: the transpose is a flipped forward convolution, padded d (k - 1) - p
        "conv-unpadded": nn.Conv2d(3, 4, 3),
        "conv-5x3-dilated": nn.Conv2d(3, 4, (5, 3), padding=(3, 1), dilation=(2, 1)),
        "conv-same": nn.Conv2d(3, 4, 3, padding="same"),
        "conv-valid": nn.Conv2d(3, 4, 3, padding="valid"),
        # padding wider than d (k - 1): transposed by conv2d_input; "same" on an even kernel: by autograd
        "conv-overpadded": nn.Conv2d(3, 4, 3, padding=3),
        "conv-same-even-kernel": nn.Conv2d(3, 4, 4, padding="same"),
    }


def _input(layer: nn.Module, nonnegative: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (3, 12) if isinstance(layer, nn.Linear) else (3, layer.in_channels, 9, 9)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.abs() if nonnegative else x


def _relevance(layer: nn.Module, rule: object, x: torch.Tensor) -> torch.Tensor:
    """Relevance of x through one hooked layer, with output relevance given by a fixed random tensor."""
    composite = LayerMapComposite(layer_map=[((nn.Linear, nn.Conv2d), rule)])
    x = x.clone().requires_grad_(True)
    with composite.context(layer) as hooked:
        output = hooked(x)
        generator = torch.Generator().manual_seed(2)
        relevance_out = torch.rand(output.shape, generator=generator, dtype=torch.float64)
        (relevance,) = torch.autograd.grad(output, x, grad_outputs=relevance_out)
    return relevance


PAIRS = {
    "epsilon": (lambda: Epsilon(epsilon=1e-6), lambda: FastEpsilon(1e-6)),
    "zplus": (lambda: ZPlus(stabilizer=1e-6), lambda: FastZPlus(1e-6)),
    "alpha2beta1": (lambda: AlphaBeta(alpha=2.0, beta=1.0), lambda: FastAlphaBeta(2.0, 1.0)),
    "alpha1beta0": (lambda: AlphaBeta(alpha=1.0, beta=0.0), lambda: FastAlphaBeta(1.0, 0.0)),
    "flat": (lambda: Flat(stabilizer=1e-6), lambda: FastFlat(1e-6)),
}


@pytest.mark.parametrize("nonnegative", [True, False], ids=["x>=0", "signed-x"])
@pytest.mark.parametrize("layer_name", list(_layers()))
@pytest.mark.parametrize("rule_name", list(PAIRS))
def test_fast_rule_equals_zennit_stock_rule(rule_name: str, layer_name: str, nonnegative: bool) -> None:
    layer = _layers()[layer_name].double()
    stock, fast = (make() for make in PAIRS[rule_name])
    x = _input(layer, nonnegative)
    expected = _relevance(layer, stock, x)
    actual = _relevance(layer, fast, x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer_name", list(_layers()))
def test_inactive_hook_backward_is_the_true_input_gradient(layer_name: str) -> None:
    """Inside ``composite.inactive()`` a hooked layer's backward is W^T g, as autograd's on the bare layer."""
    layer = _layers()[layer_name].double()
    x = _input(layer, nonnegative=False).requires_grad_(True)
    signal = torch.rand(layer(x).shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (expected,) = torch.autograd.grad(layer(x), x, grad_outputs=signal)
    composite = LayerMapComposite(layer_map=[((nn.Linear, nn.Conv2d), FastZPlus())])
    with composite.context(layer) as hooked, composite.inactive():
        (actual,) = torch.autograd.grad(hooked(x), x, grad_outputs=signal)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_alpha_beta_rejects_parameters_zennit_rejects() -> None:
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        FastAlphaBeta(alpha=2.0, beta=2.0)


def test_copy_keeps_parameters() -> None:
    rule = FastAlphaBeta(alpha=3.0, beta=2.0, stabilizer=1e-3)
    copied = rule.copy()
    assert (copied.alpha, copied.beta, copied.stabilizer) == (3.0, 2.0, 1e-3)
    assert copied is not rule


def _cnn() -> nn.Module:
    torch.manual_seed(3)
    return (
        nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("composite", [name for name in COMPOSITE_NAMES if name != "guided_backprop"])
def test_fast_composite_equals_stock_composite(composite: str) -> None:
    model = _cnn()
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(5, 2, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    target = torch.tensor([0, 1, 2, 3, 4])
    fast = Relevance(model, composite, bounds=(-1.0, 1.0))(x, target)
    stock = Relevance(model, composite, bounds=(-1.0, 1.0), fast_rules=False)(x, target)
    assert stock.abs().max() > 0
    torch.testing.assert_close(fast, stock, rtol=1e-9, atol=1e-12)


def test_fast_composite_registers_fast_hooks_and_removes_them() -> None:
    model = _cnn()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    relevance = Relevance(model, "epsilon_plus_flat")
    with relevance.attached(x):
        names = {type(hook).__name__ for hook in relevance._require_attached().hook_refs}
    assert {"FastFlat", "FastZPlus", "FastEpsilon", "FastReLUPass"} <= names
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
