"""torchvision's zoo through every adapter (issue 11): the four LRP attacks either attack the model's own
function or refuse with a clear error, and never change the model (state_dict equal bit for bit).

Random weights with BatchNorm statistics drawn away from the identity, 32x32 inputs, two images, two
iterations: what is tested is the plumbing on real architectures, not attack strength.
"""

from __future__ import annotations

from collections.abc import Callable

import foolbox as fb
import numpy as np
import pytest
import torch
import torchvision
from art.estimators.classification import PyTorchClassifier
from torch import nn

from xaiadv.bridge import art as art_attacks
from xaiadv.bridge import foolbox as foolbox_attacks
from xaiadv.bridge import torchattacks as torchattacks_attacks
from xaiadv.plugins.relevance import Relevance

ATTACKS = ["LRPFlip", "LRPMean", "LRPGrad", "LRPGradMean"]
#: Model name -> what refuses it (None: it is attacked).
ZOO: dict[str, str | None] = {
    "resnet18": None,
    "vgg11_bn": None,
    "mobilenet_v2": r"AddBackward0 in features\.\d+ \(InvertedResidual\)",
    "densenet121": r"BatchNorm layer\(s\) cannot be merged .*norm1: its input comes from the operation Cat",
}
PARAMS = {"max_iter": 2}


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_model(
    request: pytest.FixtureRequest, seeded_with_batchnorms: Callable
) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    model = seeded_with_batchnorms(lambda: getattr(torchvision.models, request.param)(num_classes=10))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return request.param, model, x, y


def bit_for_bit(model: nn.Module) -> Callable[[], list[str]]:
    """A check, to call later, listing the state_dict entries that differ from now (keys, dtypes, bits)."""
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def changed() -> list[str]:
        after = model.state_dict()
        if list(after) != list(before):
            return sorted(set(after) ^ set(before))
        return [k for k, v in after.items() if v.dtype != before[k].dtype or not torch.equal(v, before[k])]

    return changed


def run_art(model: nn.Module, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    classifier = PyTorchClassifier(
        model, nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10, clip_values=(0.0, 1.0)
    )
    adapter = getattr(art_attacks, attack)(classifier, **PARAMS)
    x_adv = torch.from_numpy(adapter.generate(x.numpy(), y.numpy()))
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    assert torch.equal(adapter.last_result.success.cpu(), fooled)  # ART's success is the real model's
    return x_adv


def run_foolbox(model: nn.Module, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
    _, clipped, success = getattr(foolbox_attacks, attack)(**PARAMS)(
        fmodel, x, fb.criteria.Misclassification(y), epsilons=None
    )
    with torch.no_grad():
        assert torch.equal(success, model(clipped).argmax(1) != y)
    return clipped


def run_torchattacks(model: nn.Module, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return getattr(torchattacks_attacks, attack)(model, **PARAMS)(x, y)


ADAPTERS = {"art": run_art, "foolbox": run_foolbox, "torchattacks": run_torchattacks}


def test_relevance_sees_the_models_own_logits_or_refuses(zoo_model) -> None:
    name, model, x, _ = zoo_model
    changed = bit_for_bit(model)
    relevance = Relevance(model)
    if ZOO[name] is not None:
        with pytest.raises(ValueError, match=ZOO[name]), relevance.attached(x):
            relevance.forward(x)
    else:
        with relevance.attached(x):
            _, seen = relevance.forward(x)
        with torch.no_grad():
            torch.testing.assert_close(seen.detach(), model(x), rtol=1e-4, atol=1e-4)
    assert changed() == []


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("attack", ATTACKS)
def test_each_adapter_attacks_the_zoo_or_refuses_clearly_and_leaves_it_unchanged(
    zoo_model, attack: str, adapter: str
) -> None:
    name, model, x, y = zoo_model
    changed = bit_for_bit(model)
    modes = [module.training for module in model.modules()]
    if ZOO[name] is not None:
        with pytest.raises(ValueError, match=ZOO[name]):
            ADAPTERS[adapter](model, attack, x, y)
    else:
        x_adv = ADAPTERS[adapter](model, attack, x, y)
        assert x_adv.shape == x.shape
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert np.isfinite(x_adv.numpy()).all()
    assert changed() == []
    assert [module.training for module in model.modules()] == modes


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_each_adapter_warns_about_a_softmax_at_the_end_of_the_model(adapter: str) -> None:
    """Gradients through a saturated softmax vanish: every gradient attack weakens (issue 11, case 4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 10), nn.Softmax(1)
        ).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.warns(UserWarning, match="the model outputs probabilities"):
        ADAPTERS[adapter](model, "LRPGrad", x, y)
