"""Relevance from Zennit composites: conservation, a float64 LRP-epsilon oracle, per-sample targets, the
preprocessing convention, true gradients with the hooks switched off, and models left as they were found."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from zennit.composites import COMPOSITES, EpsilonPlus
from zennit.core import Composite
from zennit.rules import Epsilon
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

from xaiadv.plugins.canonize import plan_batchnorm_merges
from xaiadv.plugins.relevance import COMPOSITE_NAMES, Relevance

Factory = Callable[..., nn.Module]
CONSERVING = ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat", "epsilon_alpha2_beta1_flat"]


def unit_batch(n: int, channels: int = 1, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# ---------------------------------------------------------------- conservation and an oracle


@pytest.mark.parametrize("composite", CONSERVING)
@pytest.mark.parametrize("model_name", ["cnn_bias_free", "mlp_bias_free"])
def test_relevance_sums_to_the_target_logit(model_name: str, composite: str, tiny_model: Factory) -> None:
    """Thesis eq. 2.16 on a bias-free ReLU net: sum_i R_i = f_t(x) up to the rules' tiny epsilon."""
    model, x = tiny_model(model_name), unit_batch(6)
    target = predicted(model, x)
    conservation = Relevance(model, composite).conservation(x, target)
    assert bool((conservation.target_logit.abs() > 1e-3).all())
    torch.testing.assert_close(conservation.relevance_sum, conservation.target_logit, rtol=1e-3, atol=1e-6)
    assert bool((conservation.relative_error < 1e-3).all())


def test_conservation_diagnostic_sees_a_bias_leak(tiny_model: Factory) -> None:
    """With biases relevance leaks into them: the diagnostic must show it, or it could never fail."""
    model, x = tiny_model("mlp"), unit_batch(6)
    with torch.no_grad():
        model[1].bias.fill_(0.5)
    conservation = Relevance(model, "epsilon_plus").conservation(x, predicted(model, x))
    assert float(conservation.relative_error.max()) > 1e-2


def test_epsilon_plus_maps_linear_layers_to_the_epsilon_rule() -> None:
    """The oracle below is the epsilon rule: check that Zennit's epsilon_plus uses it for Linear."""
    linear = nn.Linear(2, 2)
    rules = [rule for types, rule in EpsilonPlus().layer_map if isinstance(linear, types)]
    assert len(rules) == 1 and isinstance(rules[0], Epsilon)


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + epsilon * sign(z), with sign(0) = +1 (Zennit's convention)."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z)


def lrp_epsilon_reference(
    weights: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """LRP-epsilon through bias-free Linear -> ReLU -> Linear: R_in = a * W^T (R_out / (z + eps sign z))."""
    activations = [x.flatten(1)]
    for index, weight in enumerate(weights):
        z = activations[-1] @ weight.T
        activations.append(z.clamp_min(0) if index < len(weights) - 1 else z)
    relevance = nn.functional.one_hot(target, weights[-1].shape[0]).to(x)
    for weight, a in zip(reversed(weights), reversed(activations[:-1]), strict=True):
        relevance = a * ((relevance / stabilize(a @ weight.T, epsilon)) @ weight)
    return relevance.view_as(x)


@pytest.mark.parametrize(
    "composite", [pytest.param("epsilon_plus", id="by-name"), pytest.param(EpsilonPlus(), id="zennit-stock")]
)
def test_epsilon_plus_on_a_linear_net_matches_a_float64_oracle(
    composite: str | EpsilonPlus, tiny_model: Factory
) -> None:
    model = tiny_model("mlp_bias_free", dtype=torch.float64)
    x = unit_batch(5).double()
    target = torch.tensor([0, 3, 5, 7, 9])
    weights = [model[1].weight.detach(), model[3].weight.detach()]
    expected = lrp_epsilon_reference(weights, x, target, epsilon=1e-6)
    relevance = Relevance(model, composite)(x, target)
    assert relevance.dtype == torch.float64
    torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)
    assert float(expected.abs().sum()) > 0


class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward keeps the gradient where both the forward input and the gradient are positive."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (grad > 0)


def guided_backprop_reference(model: nn.Sequential, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Guided backprop by hand (Springenberg et al. 2015): the target logit's gradient w.r.t. x with every
    ReLU module's backward replaced by GuidedReLU's."""
    leaf = x.clone().requires_grad_(True)
    h = leaf
    for layer in model:
        h = GuidedReLU.apply(h) if isinstance(layer, nn.ReLU) else layer(h)
    (grad,) = torch.autograd.grad(h, leaf, grad_outputs=nn.functional.one_hot(target, h.shape[1]).to(h))
    return grad


@pytest.mark.parametrize("fast_rules", [True, False], ids=["fast", "stock"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "cnn_inplace", "cnn_maxpool"])
def test_guided_backprop_matches_a_float64_oracle(
    model_name: str, fast_rules: bool, tiny_model: Factory, assert_no_hooks: Callable
) -> None:
    model = tiny_model(model_name, dtype=torch.float64)
    x = unit_batch(5).double() * 2 - 1
    target = torch.tensor([0, 3, 5, 7, 9])
    expected = guided_backprop_reference(model, x, target)
    relevance = Relevance(model, "guided_backprop", fast_rules=fast_rules)(x, target)
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-15)
    assert_no_hooks(model)
    leaf = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(leaf).gather(1, target.view(-1, 1)).sum(), leaf)
    assert not torch.allclose(expected, plain)  # the guided rule changed the gradient


# ---------------------------------------------------------------- targets and batches


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box"])
def test_each_sample_gets_its_own_target(composite: str, tiny_model: Factory) -> None:
    model, x = tiny_model("cnn"), unit_batch(5)
    targets = torch.tensor([0, 3, 3, 7, 9])
    relevance = Relevance(model, composite)
    batch = relevance(x, targets)
    singles = torch.cat([relevance(x[i : i + 1], int(targets[i])) for i in range(len(x))])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-7)
    other = relevance(x, (targets + 1) % 10)
    assert not torch.allclose(batch, other)


def test_target_forms_agree(tiny_model: Factory) -> None:
    """A single int broadcasts; a list and a tensor of indices give the same relevance."""
    model, x = tiny_model("cnn"), unit_batch(3)
    relevance = Relevance(model)
    as_int = relevance(x, 4)
    assert torch.equal(as_int, relevance(x, [4, 4, 4]))
    assert torch.equal(as_int, relevance(x, torch.tensor([4, 4, 4])))


@pytest.mark.parametrize(
    "target", [[1.0, 2.0, 3.0], [1, 2], [True, False, True]], ids=["float", "wrong-count", "bool"]
)
def test_malformed_targets_are_refused(
    target: list[float], tiny_model: Factory, assert_no_hooks: Callable
) -> None:
    model = tiny_model("cnn")
    with pytest.raises(ValueError, match="target must be one integer class index per sample"):
        Relevance(model)(unit_batch(3), target)
    assert_no_hooks(model)


# ---------------------------------------------------------------- preprocessing and gradients


@pytest.mark.parametrize(
    ("composite", "mean", "std"),
    [
        ("epsilon_plus", [0.2, 0.5, 0.4], [0.3, 0.25, 2.0]),
        ("epsilon_plus_flat", [0.2, 0.5, 0.4], [0.3, 0.25, 2.0]),
        ("epsilon_gamma_box", 0.4, 0.3),
    ],
    ids=["epsilon_plus-per-channel", "epsilon_plus_flat-per-channel", "epsilon_gamma_box-scalar"],
)
def test_preprocessing_attributes_to_the_normalized_input(
    composite: str, mean: float | list[float], std: float | list[float], tiny_model: Factory
) -> None:
    """Raw x with (mean, std) gets the relevance of (x - mean) / std in the bare model, element-wise."""
    model, x = tiny_model("cnn", channels=3), unit_batch(4, channels=3)
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    normalized = (x - mean_t) / std_t
    target = predicted(model, normalized)
    raw = Relevance(model, composite, preprocessing=(mean, std))(x, target)
    box = ((0 - mean_t.flatten()[0]) / std_t.flatten()[0], (1 - mean_t.flatten()[0]) / std_t.flatten()[0])
    bare = Relevance(model, composite, bounds=(float(box[0]), float(box[1])))(normalized, target)
    torch.testing.assert_close(raw, bare, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(raw, bare / std_t)  # not rescaled by 1/std


@pytest.mark.parametrize("preprocessing", [None, ([0.1, 0.5, 0.3], [0.5, 0.2, 2.0])], ids=["raw", "mean-std"])
def test_gradient_is_the_plain_loss_gradient(preprocessing: tuple | None, tiny_model: Factory) -> None:
    """Relevance.gradient equals autograd on the bare model: the hooks are inactive for it."""
    model, x = tiny_model("cnn", channels=3), unit_batch(4, channels=3)
    labels = torch.tensor([0, 1, 2, 3])
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in preprocessing) if preprocessing else (0.0, 1.0)
    leaf = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model((leaf - mean) / std), labels, reduction="sum")
    (expected,) = torch.autograd.grad(loss, leaf)
    relevance = Relevance(model, "epsilon_plus", preprocessing=preprocessing)
    with relevance.attached(x):
        z, logits = relevance.forward(x)
        gradient = relevance.gradient(z, nn.functional.cross_entropy(logits, labels, reduction="sum"))
        hooked = relevance.relevance(z, logits, labels)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(hooked, expected, rtol=1e-2, atol=1e-4)  # with hooks active it is relevance


# ---------------------------------------------------------------- the model is left as it was found


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("model_name", ["cnn", "cnn_bn", "mlp_dropout"])
def test_no_hooks_left_and_mode_restored_after_a_call(
    model_name: str, train_mode: bool, tiny_model: Factory, assert_no_hooks: Callable
) -> None:
    model = tiny_model(model_name).train(train_mode)
    flags, before = training_flags(model), state(model)
    relevance = Relevance(model)(unit_batch(3), 1)
    assert relevance.shape == (3, 1, 8, 8)
    assert_no_hooks(model)
    assert training_flags(model) == flags
    assert_same_state(before, model)


def test_mixed_module_modes_are_restored(tiny_model: Factory) -> None:
    """A model in train mode with a frozen (eval) BatchNorm keeps exactly those flags."""
    model = tiny_model("cnn_bn").train()
    model[1].eval()
    flags = training_flags(model)
    Relevance(model)(unit_batch(2), 0)
    assert training_flags(model) == flags


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_no_hooks_left_and_mode_restored_after_an_exception(
    train_mode: bool, tiny_model: Factory, assert_no_hooks: Callable, count_hooks: Callable
) -> None:
    model = tiny_model("cnn_bn").train(train_mode)
    flags, before = training_flags(model), state(model)
    relevance = Relevance(model)
    with pytest.raises(RuntimeError, match="inside the context"), relevance.attached(unit_batch(2)):
        assert count_hooks(model) > 0 and not model.training  # the checks below can see hooks and modes
        raise RuntimeError("raised inside the context")
    assert_no_hooks(model)
    assert training_flags(model) == flags
    assert_same_state(before, model)


def test_calls_outside_the_context_are_refused(tiny_model: Factory) -> None:
    relevance = Relevance(tiny_model("cnn"))
    with pytest.raises(RuntimeError, match="not attached"):
        relevance.forward(unit_batch(1))


# ---------------------------------------------------------------- model kinds


def merged_by_hand(model: nn.Module) -> nn.Module:
    """The cnn_bn model with BatchNorm folded into the convolution: w * g / s, (b - mu) * g / s + beta."""
    conv, batch_norm = model[0], model[1]
    scale = batch_norm.weight / torch.sqrt(batch_norm.running_var + batch_norm.eps)
    merged = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    with torch.no_grad():
        merged.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        merged.bias.copy_(batch_norm.bias - batch_norm.running_mean * scale)
    return nn.Sequential(merged, *copy.deepcopy(list(model)[2:])).eval()


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_batchnorm_is_merged_for_the_pass_and_restored(
    composite: str, tiny_model: Factory, assert_no_hooks: Callable
) -> None:
    model, x = tiny_model("cnn_bn"), unit_batch(4)
    before = state(model)
    relevance = Relevance(model, composite)
    assert plan_batchnorm_merges(model, x).pairs == (("0", "1"),)
    target = predicted(model, x)
    expected = Relevance(merged_by_hand(model), composite)(x, target)
    torch.testing.assert_close(relevance(x, target), expected, rtol=1e-4, atol=1e-6)
    assert_same_state(before, model)
    assert model[0].bias is None
    assert_no_hooks(model)


def test_inplace_relu_gives_the_same_relevance(tiny_model: Factory, assert_no_hooks: Callable) -> None:
    inplace, plain, x = tiny_model("cnn_inplace"), tiny_model("cnn"), unit_batch(3)
    assert inplace[1].inplace
    torch.testing.assert_close(Relevance(inplace)(x, 2), Relevance(plain)(x, 2), rtol=0, atol=0)
    assert_no_hooks(inplace)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_functional_relu_alone_is_exact_for_lrp(composite: str, tiny_model: Factory) -> None:
    """torch.relu gates relevance as a ReLU module's Pass rule does: no warning, the module twin's result."""
    model, x = tiny_model("functional_relu"), unit_batch(3)
    twin = nn.Sequential(nn.Flatten(), model.hidden, nn.ReLU(), model.out).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = Relevance(model, composite)(x, 2)
    torch.testing.assert_close(relevance, Relevance(twin, composite)(x, 2), rtol=1e-6, atol=1e-8)
    assert float(relevance.abs().sum()) > 0


def test_functional_activations_refuse_guided_backprop(tiny_model: Factory) -> None:
    with pytest.raises(ValueError, match="guided backprop would silently equal the plain gradient"):
        Relevance(tiny_model("functional_relu"), "guided_backprop")


def test_unknown_composite_lists_the_valid_ones(tiny_model: Factory) -> None:
    with pytest.raises(ValueError, match="composite must be") as error:
        Relevance(tiny_model("cnn"), "epsilon_nonsense")
    for name in COMPOSITE_NAMES:
        assert name in str(error.value)


def randomized_batchnorms(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm's statistics and affine parameters drawn away from the identity
    (seeded), so a canonizer that failed to merge them would change the relevance; float64, eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, (low, high) in [
                    (module.weight, (0.5, 1.5)),
                    (module.bias, (-0.2, 0.2)),
                    (module.running_mean, (-0.2, 0.2)),
                    (module.running_var, (0.5, 2.0)),
                ]:
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.double().eval()


def tiny_vgg() -> torchvision.models.VGG:
    """A torchvision VGG with BatchNorm shrunk to 8 and 16 channels and a 64-32-10 classifier: 16x16 inputs.

    VGG always builds its 100M-parameter classifier; it is built on the meta device and replaced.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = torchvision.models.vgg.make_layers([8, "M", 16, "M"], batch_norm=True)
        with torch.device("meta"):
            model = torchvision.models.VGG(features, num_classes=10, init_weights=True)
        model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        model.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10))
    return randomized_batchnorms(model)


def tiny_resnet18() -> torchvision.models.ResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None, num_classes=10)
    return randomized_batchnorms(model)


def zennit_reference(
    model: nn.Module, composite: Composite, x: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Relevance straight from Zennit: the composite's context, one-hot output relevance, autograd."""
    leaf = x.clone().requires_grad_(True)
    with composite.context(model) as hooked:
        logits = hooked(leaf)
        one_hot = nn.functional.one_hot(target, logits.shape[1]).to(logits)
        (relevance,) = torch.autograd.grad(logits, leaf, grad_outputs=one_hot)
    return relevance


def folded_by_hand(model: nn.Module) -> nn.Module:
    """A copy of a torchvision model with each BatchNorm folded into the convolution declared just before
    it (right for VGG and ResNet) and replaced by nn.Identity: w * g / s, (b - mu) * g / s + beta."""
    folded = copy.deepcopy(model)
    previous: tuple[nn.Module, str, nn.Conv2d] | None = None
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                previous = (parent, name, child)
            elif isinstance(child, nn.BatchNorm2d) and previous is not None:
                conv = previous[2]
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(child.bias)
                conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - child.running_mean) * scale + child.bias)
                setattr(parent, name, nn.Identity())
                previous = None
    return folded.eval()


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1"])
@pytest.mark.parametrize(
    ("build", "canonizer", "side"),
    [(tiny_vgg, VGGCanonizer, 16), (tiny_resnet18, ResNetCanonizer, 32)],
    ids=["vgg", "resnet18"],
)
def test_torchvision_model_gets_its_canonizer_and_matches_zennit(
    build: Callable[[], nn.Module], canonizer: type, side: int, composite: str, assert_no_hooks: Callable
) -> None:
    """Our (fast) relevance equals Zennit's stock composite with the model's canonizer on the model with its
    BatchNorms folded by hand, in float64 (Zennit's own merge leaves each BatchNorm as x / sqrt(1 + eps),
    which ours does not); the canonizer matters and the BatchNorm statistics are restored."""
    model = build()
    before = state(model)
    relevance = Relevance(model, composite)
    assert relevance.canonizers is None  # chosen by data flow when attached
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor([3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = relevance(x, target)
    assert_no_hooks(model)
    assert_same_state(before, model)
    expected = zennit_reference(
        folded_by_hand(model), COMPOSITES[composite](canonizers=[canonizer()]), x, target
    )
    uncanonized = zennit_reference(model, COMPOSITES[composite](), x, target)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert not torch.allclose(expected, uncanonized, rtol=1e-2, atol=0)
    assert_same_state(before, model)


def test_resnet_blocks_outside_a_resnet_are_canonized_as_zennit_does() -> None:
    """torchvision residual blocks in any model get Zennit's block canonizers (their sums become Sum
    modules) next to the BatchNorm merge: the relevance equals Zennit's ResNetCanonizer's on the model
    with its BatchNorms folded by hand, in float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = torchvision.models.resnet.BasicBlock(3, 3)
        model = nn.Sequential(
            nn.Conv2d(3, 3, 1), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)
        )
    model = randomized_batchnorms(model).double().eval()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = Relevance(model, "epsilon_plus_flat")(x, target)
    composite = COMPOSITES["epsilon_plus_flat"](canonizers=[ResNetCanonizer()])
    expected = zennit_reference(folded_by_hand(model), composite, x, target)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
