"""The Foolbox adapters, driven exactly as Foolbox drives its own attacks, on a tiny CNN trained on digits."""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import eagerpy as ep
import foolbox as fb
import pytest
import torch
from foolbox.criteria import Misclassification, TargetedMisclassification
from torch import nn

from xaiadv.bridge.foolbox import LRPAttack, LRPFlip, LRPGrad, LRPGradMean, LRPMean, module_of
from xaiadv.plugins.attacks import lrp_grad

#: Per attack: parameters and the share of samples the raw result must fool. Measured on the 96 samples
#: below: flip 1.00, mean 0.95, grad 1.00, grad+mean 1.00; floors a bit below.
ATTACKS: dict[type[LRPAttack], tuple[dict[str, Any], float]] = {
    LRPFlip: ({"max_iter": 30}, 0.9),
    LRPMean: ({"eps": 0.1, "n_batch": 0.3, "max_iter": 30}, 0.85),
    LRPGrad: ({"eps": 0.05, "max_iter": 30}, 0.9),
    LRPGradMean: ({"eps": 0.05, "max_iter": 30}, 0.9),
}
GRAD = ATTACKS[LRPGrad][0]
#: LRPGrad towards (label + 1) % 10 reached the target on 1.00 of the samples.
TARGETED_FLOOR = 0.9
EPSILONS = [0.5, 2.0, 8.0, None]
MEAN, STD = 0.3, 0.4


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fold_normalization(net: nn.Sequential, mean: float, std: float) -> nn.Sequential:
    """A copy of ``net`` that takes (x - mean) / std and computes what ``net`` does on x (unpadded conv)."""
    folded = copy.deepcopy(net)
    conv = folded[0]
    with torch.no_grad():
        conv.bias += mean * conv.weight.sum(dim=(1, 2, 3))
        conv.weight *= std
    return folded


def predictions(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x).argmax(1)


def l_norm(delta: torch.Tensor, p: float) -> torch.Tensor:
    return delta.flatten(1).norm(p=p, dim=1)


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.__name__)
def test_clipped_results_lie_within_each_epsilon_and_success_matches_the_model(
    attack_cls, digits_unpadded
) -> None:
    net, x, y = digits_unpadded
    params, floor = ATTACKS[attack_cls]
    attack = attack_cls(**params)
    raw, clipped, success = attack(
        fb.PyTorchModel(net, bounds=(0, 1)), x, Misclassification(y), epsilons=EPSILONS
    )

    assert success.shape == (len(EPSILONS), len(x))
    for k, epsilon in enumerate(EPSILONS):
        assert torch.equal(raw[k], raw[0])
        if epsilon is not None:
            assert bool((l_norm(clipped[k] - x, 1) <= epsilon * (1 + 1e-5)).all())
        assert torch.equal(success[k], predictions(net, clipped[k]) != y)
    assert float(raw[0].min()) >= 0.0 and float(raw[0].max()) <= 1.0
    assert float((predictions(net, raw[0]) != y).float().mean()) >= floor
    assert int(success[0].sum()) < int(success[-1].sum())


def test_l2_distance_clips_in_l2(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    epsilons = [0.3, 1.0]
    attack = LRPGrad(distance="l2", **GRAD)
    raw, clipped, success = attack(
        fb.PyTorchModel(net, bounds=(0, 1)), x, Misclassification(y), epsilons=epsilons
    )

    for k, epsilon in enumerate(epsilons):
        expected = l_norm(raw[k] - x, 2).clamp(max=epsilon)
        torch.testing.assert_close(l_norm(clipped[k] - x, 2), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(success[k], predictions(net, clipped[k]) != y)


def test_single_epsilon_and_eagerpy_inputs_return_their_own_types(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    fmodel = fb.PyTorchModel(net, bounds=(0, 1))
    raw, clipped, success = LRPGrad(**GRAD)(fmodel, x, Misclassification(y), epsilons=2.0)
    raw_ep, _, success_ep = LRPGrad(**GRAD)(fmodel, ep.astensor(x), Misclassification(y), epsilons=None)

    assert isinstance(raw, torch.Tensor) and raw.shape == x.shape and success.shape == (len(x),)
    assert isinstance(raw_ep, ep.PyTorchTensor) and torch.equal(raw_ep.raw, raw)
    assert torch.equal(success_ep.raw, predictions(net, raw) != y)
    assert bool((l_norm(clipped - x, 1) <= 2.0 * (1 + 1e-5)).all())


def test_targeted_lrp_grad_reaches_the_targets(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    target = (y + 1) % 10
    attack = LRPGrad(**GRAD)
    raw, _, success = attack(
        fb.PyTorchModel(net, bounds=(0, 1)), x, TargetedMisclassification(target), epsilons=None
    )

    assert torch.equal(success, predictions(net, raw) == target)
    assert float(success.float().mean()) >= TARGETED_FLOOR


@pytest.mark.parametrize("attack_cls", [LRPFlip, LRPMean], ids=lambda cls: cls.__name__)
def test_untargeted_attacks_refuse_a_target(attack_cls, digits_unpadded) -> None:
    net, x, y = digits_unpadded
    fmodel = fb.PyTorchModel(net, bounds=(0, 1))
    with pytest.raises(ValueError, match="cannot honour a target"):
        attack_cls()(fmodel, x, TargetedMisclassification((y + 1) % 10), epsilons=None)


def test_unsupported_criterion_is_refused(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    criterion = Misclassification(y) & Misclassification(y)
    with pytest.raises(ValueError, match="criterion must be Misclassification"):
        LRPGrad()(fb.PyTorchModel(net, bounds=(0, 1)), x, criterion, epsilons=None)


def test_fmodel_preprocessing_is_honoured(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    folded = fold_normalization(net, MEAN, STD)
    fmodel = fb.PyTorchModel(folded, bounds=(0, 1), preprocessing={"mean": [MEAN], "std": [STD], "axis": -3})
    raw, _, success = LRPGrad(**GRAD)(fmodel, x, Misclassification(y), epsilons=None)

    expected = lrp_grad(folded, x, y, preprocessing=(MEAN, STD), **GRAD)
    ignoring = lrp_grad(folded, x, y, **GRAD)
    assert torch.equal(raw, expected.x_adv)
    assert torch.equal(success, expected.success)
    assert not torch.equal(raw, ignoring.x_adv)


def test_per_channel_preprocessing_on_three_channels() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).eval()
    x = torch.rand(8, 3, 8, 8)
    mean, std = [0.2, 0.5, 0.7], [0.3, 0.2, 0.25]
    fmodel = fb.PyTorchModel(net, bounds=(0, 1), preprocessing={"mean": mean, "std": std, "axis": -3})
    labels = predictions(fmodel, x)
    raw, _, _ = LRPGrad(**GRAD)(fmodel, x, Misclassification(labels), epsilons=None)

    expected = lrp_grad(net, x, labels, preprocessing=(mean, std), **GRAD)
    assert torch.equal(raw, expected.x_adv)


@pytest.mark.parametrize(
    ("preprocessing", "match"),
    [
        ({"mean": [MEAN] * 8, "std": [STD] * 8, "axis": -1}, "channel axis"),
        ({"mean": MEAN, "std": STD, "flip_axis": -3}, "flip_axis"),
    ],
    ids=["last-axis", "flip"],
)
def test_preprocessing_the_plugin_cannot_apply_is_refused(preprocessing, match, digits_unpadded) -> None:
    net, x, y = digits_unpadded
    fmodel = fb.PyTorchModel(net, bounds=(0, 1), preprocessing=preprocessing)
    with pytest.raises(ValueError, match=match):
        LRPGrad()(fmodel, x, Misclassification(y), epsilons=None)


def test_transformed_bounds_scale_the_attack(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    fmodel = fb.PyTorchModel(net, bounds=(0, 1))
    raw, _, success = LRPGrad(**GRAD)(fmodel, x, Misclassification(y), epsilons=None)
    params = {**GRAD, "eps": GRAD["eps"] * 255}
    scaled = fmodel.transform_bounds((0, 255))
    raw_255, _, success_255 = LRPGrad(**params)(scaled, x * 255, Misclassification(y), epsilons=None)

    assert torch.equal(success_255, success)
    torch.testing.assert_close(raw_255 / 255, raw, atol=1e-4, rtol=0)


def test_the_module_is_recovered_from_a_pytorch_model(digits_unpadded) -> None:
    net, _, _ = digits_unpadded
    assert module_of(fb.PyTorchModel(net, bounds=(0, 1))) is net


class CustomModel(fb.models.base.Model):
    """A Foolbox model of one's own: the torch module cannot be read from it."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    @property
    def bounds(self) -> fb.types.Bounds:
        return fb.types.Bounds(0, 1)

    def __call__(self, inputs: Any) -> Any:
        x, restore_type = ep.astensor_(inputs)
        return restore_type(ep.astensor(self.net(x.raw)))


def test_a_module_that_cannot_be_recovered_needs_model_argument(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    with pytest.raises(TypeError, match="pass model="):
        LRPGrad()(CustomModel(net), x, Misclassification(y), epsilons=None)

    raw, _, success = LRPGrad(model=net, **GRAD)(CustomModel(net), x, Misclassification(y), epsilons=None)
    expected = lrp_grad(net, x, y, **GRAD)
    assert torch.equal(raw, expected.x_adv)
    assert torch.equal(success, expected.success)


def test_repr_shows_the_configuration() -> None:
    text = repr(LRPGrad(eps=0.05, max_iter=7, distance="l2"))
    assert text.startswith("LRPGrad(")
    for part in ("eps=0.05", "max_iter=7", "n_batch=", "composite='epsilon_plus_flat'", "distance='l2'"):
        assert part in text
    assert "flip_back=False" in repr(LRPFlip())


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
        ({"n_batch": 0}, ValueError, "n_batch must be > 0"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"momentum": -1.0}, ValueError, "momentum"),
        ({"steps": 10}, TypeError, "unknown parameter"),
        ({"targeted": True}, TypeError, "criterion chooses targeting"),
        ({"trace": True}, TypeError, "no trace"),
        ({"distance": "l3"}, ValueError, "distance must be one of"),
        ({"model": "net"}, TypeError, r"model must be a torch\.nn\.Module"),
    ],
    ids=["eps", "n_batch", "max_iter", "momentum", "unknown", "targeted", "trace", "distance", "model"],
)
def test_bad_parameters_raise_at_construction(params, error, match) -> None:
    with pytest.raises(error, match=match):
        LRPGrad(**params)


def test_flip_refuses_parameters_it_does_not_have() -> None:
    with pytest.raises(TypeError, match="unknown parameter"):
        LRPFlip(eps=0.1)


def test_callers_inputs_and_model_are_unmodified(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    x_before, y_before = x.clone(), y.clone()
    weights = {name: value.clone() for name, value in net.state_dict().items()}
    LRPGradMean(**GRAD)(fb.PyTorchModel(net, bounds=(0, 1)), x, Misclassification(y), epsilons=[1.0])

    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert all(torch.equal(value, weights[name]) for name, value in net.state_dict().items())
    assert not net.training


def _spoiled(x: torch.Tensor, case: str) -> torch.Tensor:
    x = x[:4].clone()
    x[-1, 0, 2, 2] = {"nan": float("nan"), "inf": float("inf"), "above-bounds": 1.5}.get(case, 0.0)
    return x.double() if case == "float64" else x


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("nan", "inputs contains NaN or Inf"),
        ("inf", "inputs contains NaN or Inf"),
        ("above-bounds", r"inputs has values in \[.*\], outside the bounds \[0.0, 1.0\]"),
        ("float64", "inputs have dtype torch.float64 but the model's parameters torch.float32"),
    ],
)
def test_bad_inputs_get_a_clear_error_before_any_work(case, match, digits_unpadded, counting_model) -> None:
    """Foolbox's own bound check is a bare assert, and float64 inputs would fail only in its success check
    after the attack: ours name the problem before the model runs."""
    net, x, y = digits_unpadded
    model = counting_model(net).eval()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    with pytest.raises(ValueError, match=match):
        LRPGrad(**GRAD)(fmodel, _spoiled(x, case), Misclassification(y[:4]), epsilons=[1.0])
    assert model.calls == 0


@pytest.mark.parametrize("epsilons", [[0.5, None], 1.0], ids=["list", "scalar"])
def test_an_empty_batch_returns_empty_results_as_foolbox_shapes_them(
    epsilons, digits_unpadded, counting_model
) -> None:
    net, x, _ = digits_unpadded
    model = counting_model(net).eval()
    empty = x[:0]
    raw, clipped, success = LRPGrad(**GRAD)(
        fb.PyTorchModel(model, bounds=(0, 1)),
        empty,
        Misclassification(torch.zeros(0, dtype=torch.long)),
        epsilons=epsilons,
    )
    if isinstance(epsilons, list):
        assert len(raw) == len(clipped) == 2 and success.shape == (2, 0)
        assert all(item.shape == empty.shape for item in [*raw, *clipped])
    else:
        assert raw.shape == clipped.shape == empty.shape and success.shape == (0,)
    assert success.dtype == torch.bool
    assert model.calls == 0


@pytest.mark.parametrize("mode", ["train", "train-frozen-bn"])
def test_a_train_mode_model_keeps_its_modes_and_batchnorm_statistics(
    mode, tiny_model, digits_unpadded
) -> None:
    """Foolbox's own success check calls the model: in train mode it would update BatchNorm's running
    statistics. The adapter keeps the module in eval mode for the whole call and restores every flag."""
    model = tiny_model("cnn_bn").train()
    if mode == "train-frozen-bn":
        model[1].eval()
    modes = [module.training for module in model.modules()]
    state = {name: value.clone() for name, value in model.state_dict().items()}
    _, x, y = digits_unpadded
    with pytest.warns(UserWarning, match="training mode"):  # Foolbox's own warning at construction
        fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    raw, _, success = LRPGrad(**GRAD)(fmodel, x[:8], Misclassification(y[:8]), epsilons=[None])

    assert [module.training for module in model.modules()] == modes
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(success[0], model.eval()(raw[0]).argmax(1) != y[:8])  # judged in eval mode


def test_import_without_foolbox_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "foolbox", None)
    monkeypatch.delitem(sys.modules, "xaiadv.bridge.foolbox")
    with pytest.raises(ImportError, match=r"xaiadv\[foolbox\]"):
        importlib.import_module("xaiadv.bridge.foolbox")
