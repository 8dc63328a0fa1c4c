"""The registry: one name per attack (ours and the libraries'), one ``(x, y) -> x_adv`` callable per name."""

from __future__ import annotations

import re
from typing import Any

import art.attacks.evasion
import pytest
import torch
from torch import nn

from xaiadv.bridge.registry import SOURCES, BuiltAttack, available_attacks, build_attack

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED = [
    "xaiadv:LRPGrad",
    "xaiadv:LRPFlip",
    "xaiadv:LRPMean",
    "xaiadv:LRPGradMean",
    "xaiadv:IFGSMNoise",
    "art:BasicIterativeMethod",
    "art:DeepFool",
    "foolbox:LinfPGD",
    "foolbox:L2CarliniWagnerAttack",
    "torchattacks:PGD",
    "torchattacks:BIM",
]
EPS = 0.1
#: One attack per source with an Linf budget EPS (ours has none: it moves at most eps per iteration).
#: Measured share of the 100 correctly classified digits fooled (seed 0): art 0.57, foolbox 0.57, torchattacks
#: 0.57 (0.54-0.57 over seeds 0-5), xaiadv 0.52; floors a little below.
BUILT: dict[str, tuple[dict[str, Any], float | None, float]] = {
    "xaiadv:LRPGrad": ({"eps": 0.02, "max_iter": 10}, None, 0.45),
    "art:BasicIterativeMethod": ({"eps": EPS, "eps_step": 0.02, "max_iter": 10, "verbose": False}, EPS, 0.5),
    "foolbox:LinfPGD": ({"epsilons": EPS, "abs_stepsize": 0.02, "steps": 10}, EPS, 0.5),
    "torchattacks:PGD": ({"eps": EPS, "alpha": 0.02, "steps": 10}, EPS, 0.5),
}
#: The same iterative sign-gradient attack in every library; eps = 1 leaves the budget projection inactive
#: (torchattacks' BIM clamps to [x - eps, x + eps] and then [0, 1]), so only the step and clipping act.
STEP, STEPS = 0.02, 10
SAME_ATTACK: dict[str, dict[str, Any]] = {
    "xaiadv:LRPGrad": {"eps": STEP, "n_batch": 1.0, "early_stop": False, "max_iter": STEPS},
    "art:BasicIterativeMethod": {"eps": 1.0, "eps_step": STEP, "max_iter": STEPS, "verbose": False},
    "torchattacks:BIM": {"eps": 1.0, "alpha": STEP, "steps": STEPS},
    "foolbox:LinfBasicIterativeAttack": {"epsilons": 1.0, "abs_stepsize": STEP, "steps": STEPS},
}
MEAN, STD = 0.3, 0.4


def fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.float()).argmax(1) != y


# --- available_attacks -------------------------------------------------------------------------------


def test_available_attacks_lists_ours_and_the_reference_attacks() -> None:
    names = available_attacks()
    missing = [name for name in EXPECTED if name not in names]
    assert not missing, f"missing {missing}"


def test_names_are_sorted_and_shaped_source_colon_name() -> None:
    names = available_attacks()
    assert names == sorted(names) and len(names) == len(set(names))
    for name in names:
        source, _, attack = name.partition(":")
        assert source in SOURCES and re.fullmatch(r"[A-Z][A-Za-z0-9_]*", attack), name


@pytest.mark.parametrize("source", SOURCES)
def test_a_source_lists_only_its_own_attacks(source) -> None:
    names = available_attacks(source)
    assert names and all(name.startswith(f"{source}:") for name in names)
    assert names == [name for name in available_attacks() if name.startswith(f"{source}:")]


def test_an_unknown_source_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"source must be one of xaiadv, art, foolbox, torchattacks; got 'ART'"
    ):
        available_attacks("ART")


@pytest.mark.parametrize(
    "name", ["DPatch", "RobustDPatch", "OverloadPyTorch", "SNAL", "ProjectedGradientDescentTensorFlowV2"]
)
def test_art_attacks_on_other_estimators_are_absent(name) -> None:
    """Object-detector attacks (DPatch, RobustDPatch by their requirements; OverloadPyTorch, SNAL despite
    their empty requirements) and TensorFlow-only ones cannot attack a torch classifier: not listed."""
    assert isinstance(getattr(art.attacks.evasion, name), type)
    assert f"art:{name}" not in available_attacks()
    with pytest.raises(ValueError, match=f"unknown attack 'art:{name}'"):
        build_attack(f"art:{name}", model=nn.Linear(2, 2))


# --- build_attack ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT)
def test_built_attacks_return_x_adv_within_budget_and_bounds(name, digits_cnn, digits_correct) -> None:
    x, y = digits_correct
    params, budget, floor = BUILT[name]
    x64 = x.double()
    attack = build_attack(name, model=digits_cnn, bounds=(0, 1), **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # foolbox's and torchattacks' PGD start from a random point
        x_adv = attack(x64, y)

    assert isinstance(attack, BuiltAttack) and attack.name == name
    assert isinstance(x_adv, torch.Tensor) and x_adv.shape == x.shape and x_adv.dtype == torch.float64
    linf = float((x_adv - x64).abs().max())
    if budget is not None:
        assert linf <= budget + 1e-6
    else:
        assert linf <= params["eps"] * params["max_iter"] + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(fooled(digits_cnn, x_adv, y).float().mean()) >= floor


def test_a_minimization_attack_needs_no_epsilons(digits_cnn, digits_correct) -> None:
    x, y = digits_correct[0][:10], digits_correct[1][:10]
    attack = build_attack("foolbox:L2CarliniWagnerAttack", model=digits_cnn, steps=10, binary_search_steps=2)
    x_adv = attack(x, y)

    assert x_adv.shape == x.shape and float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert bool(fooled(digits_cnn, x_adv, y).any())


def test_every_library_attacks_the_same_normalized_model(digits_cnn, digits_correct) -> None:
    x, y = digits_correct
    results = {
        name: build_attack(name, model=digits_cnn, preprocessing=(MEAN, STD), **params)(x, y)
        for name, params in SAME_ATTACK.items()
    }
    reference = results.pop("xaiadv:LRPGrad")
    for name, x_adv in results.items():
        torch.testing.assert_close(x_adv, reference, atol=1e-5, rtol=0, msg=name)
    unnormalized = build_attack("xaiadv:LRPGrad", model=digits_cnn, **SAME_ATTACK["xaiadv:LRPGrad"])(x, y)
    assert float((unnormalized - reference).abs().max()) > 0.1


def test_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown attack 'art:Nope'; valid names: .*art:DeepFool.*xaiadv:LRPGrad"
    ):
        build_attack("art:Nope", model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"unknown attack 'LRPGrad'; valid names"):
        build_attack("LRPGrad", model=nn.Linear(2, 2))


def test_a_fixed_epsilon_foolbox_attack_without_epsilons_is_refused(digits_cnn) -> None:
    with pytest.raises(ValueError, match=r"foolbox:LinfPGD is a fixed-epsilon attack: pass epsilons="):
        build_attack("foolbox:LinfPGD", model=digits_cnn, steps=5)


@pytest.mark.parametrize("bounds", [(0, 255), (-1, 1)])
def test_torchattacks_refuse_bounds_other_than_unit(bounds, digits_cnn) -> None:
    with pytest.raises(ValueError, match=r"torchattacks attacks work on inputs in \[0, 1\]; got bounds"):
        build_attack("torchattacks:PGD", model=digits_cnn, bounds=bounds)


def test_a_model_that_is_not_a_module_is_refused() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module; got function"):
        build_attack("xaiadv:LRPGrad", model=lambda x: x)


@pytest.mark.parametrize("name", SAME_ATTACK)
def test_y_none_uses_the_models_predictions(name, digits_cnn, mixed_digits) -> None:
    attack = build_attack(name, model=digits_cnn, **{**SAME_ATTACK[name]})
    x, wrong = mixed_digits.x, mixed_digits.wrong
    without_y = attack(x, None)
    with_predictions = attack(x, mixed_digits.prediction)
    with_labels = attack(x, mixed_digits.label)

    torch.testing.assert_close(without_y, with_predictions, atol=0, rtol=0)
    # The misclassified digits are pushed away from their prediction, not from their true label.
    assert float((without_y[wrong] - with_labels[wrong]).abs().max()) > STEP


SOURCE_ATTACKS = {
    "xaiadv:LRPGrad": {"max_iter": 3},
    "art:BasicIterativeMethod": {"eps": EPS, "eps_step": 0.02, "max_iter": 3, "verbose": False},
    "foolbox:LinfPGD": {"epsilons": EPS, "steps": 3},
    "torchattacks:PGD": {"eps": EPS, "alpha": 0.02, "steps": 3},
}


@pytest.mark.parametrize("with_labels", [True, False], ids=["y", "y=None"])
@pytest.mark.parametrize("mode", ["train", "eval", "train-frozen-bn"])
@pytest.mark.parametrize("name", SOURCE_ATTACKS)
def test_model_mode_and_weights_are_as_before(name, mode, with_labels, tiny_model, digits_correct) -> None:
    model = tiny_model("cnn_bn")
    model.train(mode != "eval")
    if mode == "train-frozen-bn":
        model[1].eval()
    modes = [module.training for module in model.modules()]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    x, y = digits_correct[0][:6], digits_correct[1][:6]

    build_attack(name, model=model, **SOURCE_ATTACKS[name])(x, y if with_labels else None)

    assert [module.training for module in model.modules()] == modes
    changed = [key for key, value in model.state_dict().items() if not torch.equal(value, state[key])]
    assert not changed, f"{name} changed {changed}"


@pytest.mark.parametrize("name", SOURCE_ATTACKS)
def test_an_empty_batch_gives_an_empty_batch(name, digits_cnn, digits_correct) -> None:
    x, y = digits_correct
    attack = build_attack(name, model=digits_cnn, **SOURCE_ATTACKS[name])
    for labels in (y[:0], None):
        x_adv = attack(x[:0], labels)
        assert x_adv.shape == (0, 1, 8, 8) and x_adv.dtype == x.dtype
