"""Models users bring (issue 11): the attack runs on the caller's own function, never changes their model,
and fails loudly with an error that names the layer, the argument or the device.

Each test reproduces a trial that gave a silently wrong answer, a corrupted model or a raw error before.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm

from xaiadv.plugins.attacks import lrp_flip, lrp_grad, lrp_mean
from xaiadv.plugins.canonize import (
    ExactMergeBatchNorm,
    check_canonized,
    model_restored,
    plan_batchnorm_merges,
)
from xaiadv.plugins.relevance import Relevance


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_for_bit(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The state_dict has the same keys, dtypes, shapes and bits as ``before``."""
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [
        name
        for name, tensor in after.items()
        if tensor.dtype != before[name].dtype or not torch.equal(tensor, before[name])
    ]
    assert changed == [], f"changed: {changed}"


def images(n: int, channels: int = 1, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


class DeclaredOutOfOrder(nn.Module):
    """The issue's repro: declares conv_in, conv_out, bn, fc; computes
    fc(relu(conv_out(relu(bn(conv_in(x)))))). Zennit's sequential merge folds bn into conv_out, the layer
    declared just before it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv_out(F.relu(self.bn(self.conv_in(x))))).flatten(1))


class BatchNormsDeclaredLast(nn.Module):
    """Declares conv1, conv2, bn1, bn2 (widths ``first`` and ``second``); computes
    fc(relu(bn2(conv2(relu(bn1(conv1(x)))))))."""

    def __init__(self, first: int = 16, second: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, first, 3, padding=1)
        self.conv2 = nn.Conv2d(first, second, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(first)
        self.bn2 = nn.BatchNorm2d(second)
        self.fc = nn.Linear(second * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))).flatten(1))


# ---------------------------------------------------------------- 1. the merge follows the data flow


def test_batchnorm_is_paired_with_the_layer_that_feeds_it_not_the_one_declared_before_it(
    seeded_with_batchnorms: Callable,
) -> None:
    model, x = seeded_with_batchnorms(DeclaredOutOfOrder), images(4)
    assert plan_batchnorm_merges(model, x).pairs == (("conv_in", "bn"),)
    model = seeded_with_batchnorms(BatchNormsDeclaredLast)
    assert plan_batchnorm_merges(model, x).pairs == (("conv1", "bn1"), ("conv2", "bn2"))


def test_the_attack_sees_the_models_own_logits_and_its_successes_are_real(
    seeded_with_batchnorms: Callable,
) -> None:
    """Before: 64/64 reported successes, 0 real ones, logits off by up to 0.62. Now the logits the attack
    works on equal the model's and every reported success is a misclassification of the real model."""
    model, x = seeded_with_batchnorms(DeclaredOutOfOrder), images(64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    relevance = Relevance(model)
    with relevance.attached(x):
        _, seen = relevance.forward(x)
    torch.testing.assert_close(seen.detach(), logits, rtol=1e-5, atol=1e-5)
    result = lrp_grad(model, x, y, eps=0.004, max_iter=20)
    with torch.no_grad():
        really_fooled = model(result.x_adv).argmax(1) != y
    assert torch.equal(result.success, really_fooled)
    assert int(result.success.sum()) >= 1  # the attack does something: the comparison is not vacuous


def test_a_batchnorm_no_linear_layer_feeds_is_refused_naming_it_and_its_source(
    seeded_with_batchnorms: Callable,
) -> None:
    class PooledThenNormalized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(self.pool(self.relu(self.conv(x)))).flatten(1))

    model, x = seeded_with_batchnorms(PooledThenNormalized), images(2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"bn: its input comes from layer pool, not straight from a linear"):
        lrp_grad(model, x, max_iter=2)
    assert_bit_for_bit(before, model)
    # Guided backprop (a gradient method) is exact through a BatchNorm: nothing to refuse.
    assert Relevance(model, "guided_backprop")(x, 0).shape == x.shape


def test_a_linear_output_used_twice_is_not_merged(seeded_with_batchnorms: Callable) -> None:
    """Merging would change conv's output for its second consumer too."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.fc(torch.cat([self.bn(h), h], 2)[:, :, :8].flatten(1))

    model = seeded_with_batchnorms(Shared)
    plan = plan_batchnorm_merges(model, images(2))
    assert plan.pairs == ()
    assert plan.unmergeable == ("bn: the output of the layer feeding it, conv, is also used elsewhere",)


def test_a_canonizer_that_changes_the_function_is_refused_by_name(seeded_with_batchnorms: Callable) -> None:
    """Zennit's sequential merge on the misordered model: the one-forward check catches it."""
    model, x = seeded_with_batchnorms(DeclaredOutOfOrder), images(4)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"changes its logits by up to .*: SequentialMergeBatchNorm"):
        lrp_grad(model, x, max_iter=2, canonizers=[SequentialMergeBatchNorm()])
    assert_bit_for_bit(before, model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_data_flow_merge_keeps_the_logits_to_the_dtypes_precision(
    seeded_with_batchnorms: Callable, dtype: torch.dtype
) -> None:
    """The merged BatchNorm is exactly the identity (Zennit's leaves x / sqrt(1 + eps)), so the check holds
    in float64 too, where Zennit's own merge is off by 1e-6."""
    model, x = seeded_with_batchnorms(BatchNormsDeclaredLast).to(dtype), images(4).to(dtype)
    with torch.no_grad():
        reference = model(x)
    pairs = plan_batchnorm_merges(model, x).pairs
    check_canonized(model, x, reference, [ExactMergeBatchNorm([((a,), b) for a, b in pairs])])
    if dtype == torch.float64:
        zennit_order = [ExactMergeBatchNorm([(("conv1",), "bn1"), (("conv2",), "bn2")])]
        check_canonized(model, x, reference, zennit_order)  # same pairs, named by hand


# ---------------------------------------------------------------- 2. the caller's model is never changed


def test_densenet_is_refused_clearly_and_left_intact() -> None:
    """Before: Zennit's size-mismatch error, 5 parameter tensors changed, net(x) broken afterwards."""
    net = torchvision.models.densenet121(num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"BatchNorm layer\(s\) cannot be merged .*norm1: its input comes"):
        lrp_grad(net, x, max_iter=1)
    assert_bit_for_bit(before, net)
    with torch.no_grad():
        assert net(x).shape == (2, 10)


def test_a_misordered_zennit_merge_that_raises_half_way_leaves_the_model_intact(
    seeded_with_batchnorms: Callable,
) -> None:
    """Widths 16 and 32: Zennit folds bn1 (16) into conv2 (32 channels) and raises inside its merge."""
    model, x = seeded_with_batchnorms(BatchNormsDeclaredLast), images(2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"canonizer SequentialMergeBatchNorm failed on this model.*size"):
        lrp_grad(model, x, max_iter=2, canonizers=[SequentialMergeBatchNorm()])
    assert_bit_for_bit(before, model)
    assert model.conv2.bias.shape == (32,)


class RaisingCanonizer(Canonizer):
    """Replaces a layer's weight data and overrides its forward, then raises: what a broken canonizer does."""

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        root_module.conv1.weight.data = torch.zeros_like(root_module.conv1.weight)
        root_module.conv1.bias = None
        root_module.fc.forward = lambda x: x
        root_module.fc.register_forward_hook(lambda *args: None)
        raise RuntimeError("canonizer failed half-way")

    def register(self) -> None:
        return None

    def remove(self) -> None:
        return None


def test_a_canonizer_raising_half_way_is_undone_bit_for_bit(
    seeded_with_batchnorms: Callable, assert_no_hooks: Callable
) -> None:
    model, x = seeded_with_batchnorms(BatchNormsDeclaredLast), images(2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"canonizer RaisingCanonizer failed .*\(canonizer failed half-way"):
        Relevance(model, canonizers=[RaisingCanonizer()])(x, 0)
    assert_bit_for_bit(before, model)
    assert_no_hooks(model)
    assert model.conv1.bias is not None and "forward" not in vars(model.fc)


def test_a_hook_raising_mid_attack_leaves_the_merged_model_restored(
    seeded_with_batchnorms: Callable, assert_no_hooks: Callable
) -> None:
    model, x = seeded_with_batchnorms(DeclaredOutOfOrder), images(4)
    before = snapshot(model)
    calls = []

    def fail_on_the_fifth_call(*args: object) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("the user's hook raised")

    handle = model.fc.register_forward_hook(fail_on_the_fifth_call)
    try:
        with pytest.raises(RuntimeError, match="the user's hook raised"):
            lrp_grad(model, x, eps=0.004, max_iter=20, early_stop=False)
    finally:
        handle.remove()
    assert len(calls) == 5
    assert_bit_for_bit(before, model)
    assert_no_hooks(model)


def test_model_restored_puts_back_replaced_tensors_and_added_attributes(
    seeded_with_batchnorms: Callable,
) -> None:
    model = seeded_with_batchnorms(DeclaredOutOfOrder)
    before = snapshot(model)
    weight = model.conv_in.weight
    with pytest.raises(KeyError), model_restored(model):
        model.conv_in.weight.data = torch.zeros_like(weight)
        model.bn.running_var.data = torch.ones(8)
        model.bn.eps = 0.0
        model.fc.bias = None
        model.extra = nn.Linear(1, 1)
        raise KeyError("anything")
    assert model.conv_in.weight is weight and model.bn.eps == 1e-5 and not hasattr(model, "extra")
    assert_bit_for_bit(before, model)


# ---------------------------------------------------------------- 3. clear errors for ordinary layouts


def test_bn_declared_after_both_convs_is_attacked_not_refused(seeded_with_batchnorms: Callable) -> None:
    """Before: a raw 'size of tensor a (32) must match the size of tensor b (16)' from Zennit's merge."""
    model, x = seeded_with_batchnorms(BatchNormsDeclaredLast), images(8)
    y = model(x).argmax(1)
    result = lrp_mean(model, x, y, max_iter=3)
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)


class InnerResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.relu = nn.ReLU()
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.a(x.flatten(1)))
        return h + self.relu(self.b(h))


def test_a_residual_inside_a_custom_module_is_named_and_canonizers_is_accepted() -> None:
    model = nn.Sequential(InnerResidual(), nn.Linear(16, 10)).eval()
    x = images(2)
    with pytest.raises(ValueError, match=r"AddBackward0 in 0 \(InnerResidual\).*Pass canonizers=\[\.\.\.\]"):
        lrp_flip(model, x, max_iter=2)
    # The suggested parameter exists: an empty list runs (and warns nothing about unknown parameters).
    with pytest.raises(ValueError, match="merges two input-dependent branches"):
        lrp_flip(model, x, max_iter=2, canonizers=[])


def test_canonizers_must_be_zennit_canonizers() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(TypeError, match="canonizers must be zennit Canonizer instances; got str"):
        lrp_grad(model, images(2), canonizers=["merge"])


def test_a_tuple_output_is_a_clear_error() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.fc(x.flatten(1))
            return logits, logits.softmax(1)

    with pytest.raises(TypeError, match=r"must return one tensor .* it returned a tuple\. Wrap it"):
        lrp_grad(TwoHeads().eval(), images(2))


def test_a_model_on_another_device_is_named_with_both_devices() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="x is on device cpu but the model's parameters are on meta"):
        lrp_grad(model.eval(), images(2))


# ---------------------------------------------------------------- 4. softmax outputs


@pytest.mark.parametrize("softmax", ["module", "functional"])
def test_a_softmax_inside_the_model_is_warned_about(softmax: str) -> None:
    class FunctionalSoftmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.softmax(self.fc(x.flatten(1)), dim=1)

    if softmax == "module":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1)).eval()
    else:
        model = FunctionalSoftmax().eval()
    with pytest.warns(UserWarning, match="outputs probabilities .* not logits"):
        lrp_grad(model, images(2), max_iter=1)
    logits_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrp_grad(logits_model, images(2), max_iter=1)
