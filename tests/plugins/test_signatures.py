"""LRP signatures: the epsilon rule on the last layer, against a float64 loop and Zennit's own rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit.rules import Epsilon

from xaiadv.plugins.model import Classifier
from xaiadv.plugins.signatures import lrp_signatures


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(144, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    ).to(dtype)


def test_signatures_equal_a_float64_loop_over_samples_and_units() -> None:
    net = _net(torch.float64).eval()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    found = lrp_signatures(net, x, epsilon=1e-3)
    with torch.no_grad():
        a = net[:6](x)
        logits = net(x)
    weight = net[6].weight.detach()
    for i in range(len(x)):
        c = int(logits[i].argmax())
        z = float(logits[i, c])
        stabilized = z + 1e-3 * (1.0 if z >= 0 else -1.0)
        for j in range(a.shape[1]):
            expected = float(a[i, j]) * float(weight[c, j]) * z / stabilized
            assert float(found.values[i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert int(found.target[i]) == c
    torch.testing.assert_close(found.logits, logits)


def test_signatures_equal_zennits_epsilon_rule_on_the_last_layer_from_the_logit() -> None:
    net = _net().eval()
    x = torch.rand(9, 1, 8, 8)
    target = torch.arange(9) % 5
    found = lrp_signatures(net, x, target, epsilon=1e-6)
    with torch.no_grad():
        a = net[:6](x)
    last = nn.Linear(12, 5)
    last.load_state_dict(net[6].state_dict())
    handles = Epsilon(epsilon=1e-6).register(last)
    try:
        a = a.clone().requires_grad_(True)
        out = last(a)
        relevance_out = torch.zeros_like(out).scatter_(1, target.view(-1, 1), 1.0) * out.detach()
        (expected,) = torch.autograd.grad(out, a, grad_outputs=relevance_out)
    finally:
        handles.remove()
    torch.testing.assert_close(found.values, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(found.target, target)


def test_the_signature_sums_to_the_logit_less_the_bias_share() -> None:
    net = _net(torch.float64).eval()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    found = lrp_signatures(net, x)
    z = found.logits.gather(1, found.target.view(-1, 1)).squeeze(1)
    bias = net[6].bias[found.target].detach()
    expected = z * (z - bias) / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0).double())
    torch.testing.assert_close(found.values.sum(1), expected)


def test_batching_preprocessing_and_the_callers_state() -> None:
    net = _net().train()
    net[1].eval()  # a BatchNorm the caller froze
    x = torch.rand(20, 1, 8, 8)
    x_copy = x.clone()
    classifier = Classifier(net, preprocessing=(0.2, 0.5))
    whole = lrp_signatures(classifier, x, batch_size=256)
    chunked = lrp_signatures(classifier, x, batch_size=7)
    torch.testing.assert_close(chunked.values, whole.values, rtol=1e-6, atol=1e-7)
    plain = lrp_signatures(net, (x - 0.2) / 0.5)
    torch.testing.assert_close(plain.values, whole.values, rtol=1e-6, atol=1e-7)
    assert torch.equal(x, x_copy)
    assert net.training and not net[1].training and net[4].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_differentiable_signatures_pass_gradcheck_in_x() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2])

    def signature_sum(inputs: torch.Tensor) -> torch.Tensor:
        return lrp_signatures(net, inputs, target, differentiable=True).values

    assert torch.autograd.gradcheck(signature_sum, (x,))
    assert not lrp_signatures(net, x.detach(), target).values.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layer": "0"}, ValueError, r"layer: '0' is a Conv2d; an LRP signature needs an nn.Linear"),
        ({"layer": "9"}, ValueError, r"layer\(s\) \['9'\] not in the model"),
        ({"batch_size": 0}, ValueError, r"batch_size must be an int > 0; got 0"),
        ({"epsilon": -1.0}, ValueError, r"epsilon must be >= 0; got -1.0"),
        ({"target": torch.tensor([0, 5])}, ValueError, r"y must hold class indices in \[0, 4\]"),
    ],
    ids=["conv", "missing", "batch-size", "epsilon", "target"],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        lrp_signatures(_net().eval(), torch.rand(2, 1, 8, 8), **kwargs)


def test_an_inner_linear_layer_gives_its_inputs_signature() -> None:
    assert lrp_signatures(_net().eval(), torch.rand(2, 1, 8, 8), layer="4").values.shape == (2, 144)
