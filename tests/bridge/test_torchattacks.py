"""The torchattacks adapters, driven as torchattacks drives its own attacks, on a tiny digits CNN."""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torchattacks
from torch import nn

from xaiadv.bridge.torchattacks import LRPAttack, LRPFlip, LRPGrad, LRPGradMean, LRPMean
from xaiadv.plugins.attacks import PATTERNS, lrp_grad, make_config, run_attack

#: Per attack: parameters and the ASR floor. Measured on the 96 samples below: flip 1.00, mean 0.95,
#: grad 1.00, grad+mean 1.00; floors a bit below.
ATTACKS: dict[type[LRPAttack], tuple[dict[str, Any], float]] = {
    LRPFlip: ({"max_iter": 30}, 0.9),
    LRPMean: ({"eps": 0.1, "n_batch": 0.3, "max_iter": 30}, 0.85),
    LRPGrad: ({"eps": 0.05, "max_iter": 30}, 0.9),
    LRPGradMean: ({"eps": 0.05, "max_iter": 30}, 0.9),
}
GRAD = ATTACKS[LRPGrad][0]
#: LRPGrad towards (label + 1) % 10 reached the target on 1.00 of the samples.
TARGETED_FLOOR = 0.9
MEAN, STD = 0.3, 0.4


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def normalized(digits_unpadded) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """The digits model as if trained on (x - MEAN) / STD (first conv folded), and the normalized inputs."""
    net, x, y = digits_unpadded
    folded = copy.deepcopy(net)
    conv = folded[0]
    with torch.no_grad():
        conv.bias += MEAN * conv.weight.sum(dim=(1, 2, 3))
        conv.weight *= STD
    return folded, (x - MEAN) / STD, y


def predictions(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x).argmax(1)


def asr(net: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    return float((predictions(net, x_adv) != y).float().mean())


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.__name__)
def test_each_attack_fools_the_model_like_its_plugin(attack_cls, digits_unpadded) -> None:
    net, x, y = digits_unpadded
    params, floor = ATTACKS[attack_cls]
    x_adv = attack_cls(net, **params)(x, y)

    expected = run_attack(
        PATTERNS[attack_cls.pattern](), net, x, y, config=make_config(attack_cls.pattern, **params)
    )
    assert torch.equal(x_adv, expected.x_adv)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert asr(net, x_adv, y) >= floor


@pytest.mark.parametrize("channels", [1, 3])
def test_normalization_used_is_honoured(channels, digits_unpadded, normalized) -> None:
    if channels == 1:
        net, x_norm, y = normalized
        mean, std = [MEAN], [STD]
    else:
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).eval()
        mean, std = [0.2, 0.5, 0.7], [0.3, 0.2, 0.25]
        x_norm = (torch.rand(8, 3, 8, 8) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
            1, 3, 1, 1
        )
        y = predictions(net, x_norm)
    attack = LRPGrad(net, **GRAD)
    attack.set_normalization_used(mean=mean, std=std)
    x_adv = attack(x_norm, y)

    x_raw = attack.inverse_normalize(x_norm)
    expected = lrp_grad(net, x_raw, y, preprocessing=(mean, std), **GRAD)
    assert torch.equal(x_adv, attack.normalize(expected.x_adv))
    assert not torch.equal(expected.x_adv, lrp_grad(net, x_raw, y, **GRAD).x_adv)


def test_normalized_attack_fools_the_normalized_model(digits_unpadded, normalized) -> None:
    net_raw, x, y = digits_unpadded
    net, x_norm, _ = normalized
    attack = LRPGrad(net, **GRAD)
    attack.set_normalization_used(mean=[MEAN], std=[STD])
    x_adv = attack(x_norm, y)

    assert asr(net, x_adv, y) >= ATTACKS[LRPGrad][1]
    torch.testing.assert_close(
        attack.inverse_normalize(x_adv), LRPGrad(net_raw, **GRAD)(x, y), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("mode", ["by_label", "by_function"])
def test_targeted_lrp_grad_reaches_the_targets(mode, digits_unpadded) -> None:
    net, x, y = digits_unpadded
    target = (y + 1) % 10
    attack = LRPGrad(net, **GRAD)
    if mode == "by_label":
        attack.set_mode_targeted_by_label(quiet=True)
        x_adv = attack(x, target)
    else:
        attack.set_mode_targeted_by_function(lambda inputs, labels: (labels + 1) % 10, quiet=True)
        x_adv = attack(x, y)

    assert attack.targeted and "targeted" in attack.supported_mode
    assert float((predictions(net, x_adv) == target).float().mean()) >= TARGETED_FLOOR


@pytest.mark.parametrize("attack_cls", [LRPFlip, LRPMean], ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("mode", ["set_mode_targeted_by_label", "set_mode_targeted_random"])
def test_untargeted_attacks_refuse_targeted_modes(attack_cls, mode, digits_unpadded) -> None:
    attack = attack_cls(digits_unpadded[0])
    assert attack.supported_mode == ["default"]
    with pytest.raises(ValueError, match=r"cannot honour a target.*LRPGrad, LRPGradMean"):
        getattr(attack, mode)(quiet=True)
    assert not attack.targeted


def test_multiattack_with_normalization_beats_each_attack_alone(normalized) -> None:
    net, x_norm, y = normalized

    def attacks() -> list[torchattacks.attack.Attack]:
        weak = {**GRAD, "max_iter": 4}
        return [LRPGrad(net, **weak), torchattacks.PGD(net, eps=0.1, alpha=0.02, steps=5, random_start=False)]

    alone = []
    for attack in attacks():
        attack.set_normalization_used(mean=[MEAN], std=[STD])
        alone.append(asr(net, attack(x_norm, y), y))
    multi = torchattacks.MultiAttack(attacks())
    multi.set_normalization_used(mean=[MEAN], std=[STD])
    x_adv = multi(x_norm, y)

    assert min(alone) > 0 and max(alone) < 1
    assert asr(net, x_adv, y) >= max(alone)


def test_model_modes_are_restored_even_after_an_error(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    model = copy.deepcopy(net).train()
    model[1].eval()
    before = [module.training for module in model.modules()]
    attack = LRPGrad(model, **GRAD)
    attack.set_normalization_used(mean=[MEAN], std=[STD])
    first = attack(x, y)
    with pytest.raises(ValueError, match="class indices"):
        attack(x, y + 10)

    assert [module.training for module in model.modules()] == before
    assert True in before and False in before
    assert torch.equal(attack(x, y), first)


def test_training_mode_during_the_attack_is_refused(digits_unpadded) -> None:
    with pytest.raises(ValueError, match="eval mode"):
        LRPGrad(digits_unpadded[0]).set_model_training_mode(model_training=True)


def test_callers_inputs_and_model_are_unmodified(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    x_before, y_before = x.clone(), y.clone()
    weights = {name: value.clone() for name, value in net.state_dict().items()}
    LRPGradMean(net, **GRAD)(x, y)

    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert all(torch.equal(value, weights[name]) for name, value in net.state_dict().items())
    assert not net.training


def test_parameters_are_attributes_shown_in_repr(digits_unpadded) -> None:
    attack = LRPGrad(digits_unpadded[0], eps=0.05, max_iter=7)
    text = repr(attack)
    assert text.startswith("LRPGrad(")
    for part in ("eps=0.05", "max_iter=7", "n_batch=", "attack_mode=default", "normalization_used=False"):
        assert part in text


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"eps": -1.0}, ValueError, "eps must be > 0"),
        ({"n_batch": 0}, ValueError, "n_batch must be > 0"),
        ({"steps": 10}, TypeError, "unknown parameter"),
        ({"targeted": True}, TypeError, "set_mode_targeted"),
    ],
    ids=["eps", "n_batch", "unknown", "targeted"],
)
def test_bad_parameters_raise_at_construction(params, error, match, digits_unpadded) -> None:
    with pytest.raises(error, match=match):
        LRPGrad(digits_unpadded[0], **params)


def test_a_changed_attribute_is_validated_at_the_call(digits_unpadded) -> None:
    net, x, y = digits_unpadded
    attack = LRPGrad(net)
    attack.max_iter = 0
    with pytest.raises(ValueError, match="max_iter"):
        attack(x, y)


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        LRPGrad("net")


def test_import_without_torchattacks_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    monkeypatch.delitem(sys.modules, "xaiadv.bridge.torchattacks")
    with pytest.raises(ImportError, match=r"xaiadv\[torchattacks\]"):
        importlib.import_module("xaiadv.bridge.torchattacks")
