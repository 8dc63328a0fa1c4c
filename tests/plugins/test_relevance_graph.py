"""The first forward's graph inspection: branch merges outside a module are refused (LRP would not conserve
relevance through them), functional activations are refused for guided backprop and warned about for LRP,
once per attached context, leaving no hooks behind."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from zennit.canonizers import AttributeCanonizer
from zennit.composites import EpsilonPlus
from zennit.core import Composite
from zennit.layer import Sum

from xaiadv.plugins import relevance as relevance_module
from xaiadv.plugins.graph import GraphFindings, inspect_graph
from xaiadv.plugins.relevance import Relevance

LRP = ["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box"]
CONSERVING = ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat", "epsilon_alpha2_beta1_flat"]
MERGES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "add-inplace": lambda h, branch: h.clone().add_(branch),
}
MERGE_NODES = {
    "add": "AddBackward0",
    "sub": "SubBackward0",
    "mul": "MulBackward0",
    "add-inplace": "AddBackward0",
}


def unit_batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with parameters redrawn from ``seed`` (the global RNG is left as it was), in eval mode."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for parameter in model.parameters():
            parameter.uniform_(-0.4, 0.4)
    return model.eval()


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


class Residual(nn.Module):
    """The audit's repro: bias-free Linear a, b, o and ReLU modules r, r2; o(merge(h, r2(b(h)))), h = r(a(x)).

    ``after`` is applied to the merged tensor (an activation module behind the sum, as in a ResNet block).
    """

    def __init__(self, merge: str = "add", after: nn.Module | None = None) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.o = nn.Linear(16, 10, bias=False)
        self.r, self.r2 = nn.ReLU(), nn.ReLU()
        self.after = nn.Identity() if after is None else after
        self.merge = MERGES[merge]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.r(self.a(x.flatten(1)))
        return self.o(self.after(self.merge(h, self.r2(self.b(h)))))


class ResidualCanonizer(AttributeCanonizer):
    """Rewrites Residual's h + r2(b(h)) as zennit.layer.Sum over a stack, as Zennit's ResNetCanonizer does."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict[str, object] | None:
        if isinstance(module, Residual):
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self: Residual, x: torch.Tensor) -> torch.Tensor:
        h = self.r(self.a(x.flatten(1)))
        return self.o(self.canonizer_sum(torch.stack([h, self.r2(self.b(h))], dim=-1)))

    def copy(self) -> ResidualCanonizer:
        return ResidualCanonizer()


class Mixed(nn.Module):
    """Linear -> ReLU module -> Linear -> ``activation`` -> Linear; a plain function is invisible to hooks."""

    def __init__(self, activation: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.r = nn.ReLU()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.activation(self.b(self.r(self.a(x.flatten(1))))))


# ---------------------------------------------------------------- the graph inspection itself


@pytest.mark.parametrize(
    ("build", "merges", "activations"),
    [
        (lambda z, p: z * 2 + p, (), ()),
        (lambda z, p: torch.cat([z, (z * p).relu()], 1), (), ("ReluBackward0",)),
        (lambda z, p: z + (z * p).relu(), ("AddBackward0",), ("ReluBackward0",)),
        (lambda z, p: z * torch.sigmoid(z), ("MulBackward0",), ("SigmoidBackward0",)),
        (lambda z, p: z + z, ("AddBackward0",), ()),
        (lambda z, p: (z * p - p).tanh(), (), ("TanhBackward0",)),
    ],
    ids=["parameter-bias", "concatenation", "residual", "gate", "same-tensor-twice", "parameter-sub"],
)
def test_inspect_graph_names_merges_of_input_dependent_branches(
    build: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    merges: tuple[str, ...],
    activations: tuple[str, ...],
) -> None:
    """Only an elementwise op with two inputs that depend on z merges; a parameter or a cat does not."""
    z = torch.rand(2, 3, requires_grad=True)
    parameter = nn.Parameter(torch.rand(1, 3))
    findings = inspect_graph(z, build(z, parameter).grad_fn, set())
    assert tuple(node.name() for node in findings.merges) == merges
    assert findings.functional_activations == activations


# ---------------------------------------------------------------- branch merges


@pytest.mark.parametrize("composite", LRP)
@pytest.mark.parametrize("merge", list(MERGES))
def test_hand_written_residual_is_refused(merge: str, composite: str, assert_no_hooks: Callable) -> None:
    model = seeded(Residual(merge)).train()
    flags = training_flags(model)
    message = (
        rf"merges two input-dependent branches in 1 elementwise op\(s\) .*\({MERGE_NODES[merge]} in the "
        r"forward of the model itself \(Residual\)\).*canonizers="
    )
    with pytest.raises(ValueError, match=message):
        Relevance(model, composite)(unit_batch(), 1)
    assert_no_hooks(model)
    assert training_flags(model) == flags


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "inplace-relu"])
def test_a_sum_behind_an_activation_module_is_still_refused(inplace: bool, assert_no_hooks: Callable) -> None:
    """relu(h + f(h)), as in a ResNet block: the activation module's nodes end at its input, the sum."""
    model = seeded(Residual("add", after=nn.ReLU(inplace=inplace)))
    with pytest.raises(
        ValueError,
        match=r"merges two input-dependent branches in 1 .*\(AddBackward0 in the forward of the model itself",
    ):
        Relevance(model, "epsilon_plus")(unit_batch(), 1)
    assert_no_hooks(model)


def test_the_refused_residual_does_not_conserve_relevance() -> None:
    """The refusal is warranted: through a Composite instance (which only warns) relevance doubles."""
    model, x = seeded(Residual()), unit_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conservation = Relevance(model, EpsilonPlus()).conservation(x, 1)
    assert bool((conservation.target_logit.abs() > 1e-3).all())
    torch.testing.assert_close(
        conservation.relevance_sum, 2 * conservation.target_logit, rtol=1e-3, atol=1e-6
    )


@pytest.mark.parametrize("composite", CONSERVING)
def test_canonized_residual_is_accepted_and_conserves(composite: str, assert_no_hooks: Callable) -> None:
    """The fix the message names: a canonizer turning the sum into a Sum module, which Zennit's Norm rule
    handles; the bias-free net then conserves relevance (thesis eq. 2.16)."""
    model, x = seeded(Residual()), unit_batch(6)
    relevance = Relevance(model, composite, canonizers=[ResidualCanonizer()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conservation = relevance.conservation(x, 1)
    assert bool((conservation.target_logit.abs() > 1e-3).all())
    assert bool((conservation.relative_error < 1e-3).all())
    assert_no_hooks(model)


def test_composite_instance_warns_about_a_merge_and_can_be_silenced() -> None:
    model, x = seeded(Residual()), unit_batch()
    with pytest.warns(UserWarning, match="merges two input-dependent branches .* unless your Composite"):
        warned = Relevance(model, EpsilonPlus())(x, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        silenced = Relevance(model, EpsilonPlus())
        warnings.filterwarnings("ignore", message="model merges two input-dependent branches")
        torch.testing.assert_close(silenced(x, 1), warned, rtol=0, atol=0)
        assert (
            float(Relevance(model, Composite())(x, 1).abs().sum()) > 0
        )  # hookless: plain gradient, no check


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "guided_backprop"])
def test_biases_and_concatenation_are_accepted(composite: str) -> None:
    """Concatenated biased branches equal one Linear with the stacked weights: same relevance, no warning."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        first, second, out = nn.Linear(64, 8), nn.Linear(64, 8), nn.Linear(16, 10)

    class Concatenated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.relu, self.out = first, second, nn.ReLU(), out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.flatten(1)
            return self.out(self.relu(torch.cat([self.first(flat), self.second(flat)], 1)))

    stacked = nn.Linear(64, 16)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([first.weight, second.weight]))
        stacked.bias.copy_(torch.cat([first.bias, second.bias]))
    twin = nn.Sequential(nn.Flatten(), stacked, nn.ReLU(), out).eval()
    x, target = unit_batch(), torch.tensor([0, 3, 5, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = Relevance(Concatenated().eval(), composite)(x, target)
    torch.testing.assert_close(relevance, Relevance(twin, composite)(x, target), rtol=1e-5, atol=1e-7)
    assert float(relevance.abs().sum()) > 0


def test_guided_backprop_accepts_a_residual() -> None:
    """Guided backprop is a modified gradient, exact through a sum: no conservation to lose."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = Relevance(seeded(Residual()), "guided_backprop")(unit_batch(), 1)
    assert float(relevance.abs().sum()) > 0


# ---------------------------------------------------------------- once per attached context


def test_graph_is_inspected_once_per_attached_context(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Callable
) -> None:
    calls: list[int] = []
    original = relevance_module.inspect_graph

    def spy(*args: object) -> GraphFindings:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(relevance_module, "inspect_graph", spy)
    model, x = tiny_model("cnn"), unit_batch()
    relevance = Relevance(model)
    with relevance.attached(x):
        hooks = len(model[1]._forward_hooks)
        with torch.no_grad():
            relevance.forward(x)
        assert calls == []  # no graph to inspect: the next forward does it
        for _ in range(3):
            relevance.forward(x)
        assert len(calls) == 1
        assert len(model[1]._forward_hooks) == hooks  # the recording hooks are gone after the inspection
    with relevance.attached(x):
        relevance.forward(x)
        relevance.forward(x)
    assert len(calls) == 2
    Relevance(model, Composite())(x, 1)  # no hooks (the attacks' no-relevance path): nothing to inspect
    assert len(calls) == 2


# ---------------------------------------------------------------- functional activations


@pytest.mark.parametrize("activation", [torch.relu, torch.tanh], ids=["relu", "tanh"])
def test_guided_backprop_refuses_a_functional_activation_next_to_modules(
    activation: Callable, assert_no_hooks: Callable
) -> None:
    model = seeded(Mixed(activation)).train()
    flags = training_flags(model)
    name = {torch.relu: "ReluBackward0", torch.tanh: "TanhBackward0"}[activation]
    with pytest.raises(ValueError, match=rf"calls activations as functions \({name}\).*guided backprop"):
        Relevance(model, "guided_backprop")(unit_batch(), 1)
    assert_no_hooks(model)
    assert training_flags(model) == flags


@pytest.mark.parametrize("composite", LRP)
@pytest.mark.parametrize(
    "activation", [torch.tanh, torch.sigmoid, F.gelu, F.leaky_relu], ids=["tanh", "sigmoid", "gelu", "leaky"]
)
def test_lrp_warns_about_a_functional_non_relu_activation(activation: Callable, composite: str) -> None:
    with pytest.warns(UserWarning, match="calls activations as functions .* exact through a functional ReLU"):
        Relevance(seeded(Mixed(activation)), composite)(unit_batch(), 1)


@pytest.mark.parametrize("composite", [*LRP, "guided_backprop"])
@pytest.mark.parametrize(
    "module",
    [nn.ReLU, nn.Tanh, nn.Tanhshrink, lambda: nn.ReLU(inplace=True)],
    ids=["relu", "tanh", "tanhshrink", "relu-inplace"],
)
def test_activation_modules_are_accepted_silently(module: Callable[[], nn.Module], composite: str) -> None:
    """Tanhshrink computes x - tanh(x) inside the module: neither node is functional nor a merge."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = Relevance(seeded(Mixed(module())), composite)(unit_batch(), 1)
    assert float(relevance.abs().sum()) > 0


@pytest.mark.parametrize("composite", LRP)
def test_functional_relu_is_exact_for_lrp(composite: str) -> None:
    """A functional ReLU gates relevance as a ReLU module's Pass rule does: same relevance, no warning."""
    functional, module, x = seeded(Mixed(torch.relu)), seeded(Mixed(nn.ReLU())), unit_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = Relevance(functional, composite)(x, 1)
    torch.testing.assert_close(relevance, Relevance(module, composite)(x, 1), rtol=1e-6, atol=1e-8)
    assert float(relevance.abs().sum()) > 0
