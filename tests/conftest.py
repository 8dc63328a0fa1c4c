"""Shared fixtures: a registry of tiny models, seeded generators, scikit-learn digits, a CNN trained on them.

Everything is small enough for a 2-core CPU: models take (N, C, side, side) inputs with side <= 8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits
from torch import nn

# Tiny models: starting threads costs more than it saves, and a loaded 2-core box makes it much worse.
# The same for BLAS (scikit-learn's Gaussian mixtures): one thread for the whole session.
torch.set_num_threads(1)
_ONE_BLAS_THREAD = threadpool_limits(limits=1)


class FunctionalReLUNet(nn.Module):
    """Linear layers with ``torch.relu`` called functionally: no activation module for hooks to see."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def _mlp(channels: int, side: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(channels * side * side, 24), nn.ReLU(), nn.Linear(24, classes)
    )


def _mlp_bias_free(channels: int, side: int, classes: int) -> nn.Module:
    features = channels * side * side
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, 24, bias=False), nn.ReLU(), nn.Linear(24, classes, bias=False)
    )


def _mlp_dropout(channels: int, side: int, classes: int) -> nn.Module:
    features = channels * side * side
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, classes)
    )


def _cnn(channels: int, side: int, classes: int, *, inplace: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(4 * side * side, classes),
    )


def _cnn_maxpool(channels: int, side: int, classes: int) -> nn.Module:
    """Two conv blocks with a max-pool between them and two dense layers, as the reference CNN."""
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * (side // 2) ** 2, 16),
        nn.ReLU(),
        nn.Linear(16, classes),
    )


def _cnn_bias_free(channels: int, side: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * side * side, 16, bias=False),
        nn.ReLU(),
        nn.Linear(16, classes, bias=False),
    )


def _cnn_bn(channels: int, side: int, classes: int) -> nn.Module:
    """Conv -> BatchNorm2d -> ReLU -> Linear with non-trivial affine parameters and running statistics."""
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * side * side, classes),
    )
    batch_norm = model[1]
    with torch.no_grad():
        batch_norm.weight.uniform_(0.5, 2.0)
        batch_norm.bias.uniform_(-0.5, 0.5)
        batch_norm.running_mean.uniform_(-0.3, 0.3)
        batch_norm.running_var.uniform_(0.5, 2.0)
    return model


#: name -> factory(channels, side, classes); every model ends in logits shaped (N, classes).
TINY_MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "mlp": _mlp,
    "mlp_bias_free": _mlp_bias_free,
    "mlp_dropout": _mlp_dropout,
    "cnn": _cnn,
    "cnn_inplace": lambda channels, side, classes: _cnn(channels, side, classes, inplace=True),
    "cnn_bias_free": _cnn_bias_free,
    "cnn_bn": _cnn_bn,
    "cnn_maxpool": _cnn_maxpool,
    "functional_relu": lambda channels, side, classes: FunctionalReLUNet(channels * side * side, classes),
}

ModelFactory = Callable[..., nn.Module]


def randomize_batchnorms(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` with every BatchNorm's statistics and affine parameters drawn away from the identity
    (seeded), so that a merge into the wrong layer, or none, changes what the model computes; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for tensor, (low, high) in [
                    (module.weight, (0.5, 1.5)),
                    (module.bias, (-0.3, 0.3)),
                    (module.running_mean, (-0.3, 0.3)),
                    (module.running_var, (0.5, 2.0)),
                ]:
                    tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    return model.eval()


@pytest.fixture(scope="session")
def seeded_with_batchnorms() -> Callable[[Callable[[], nn.Module]], nn.Module]:
    """``seeded_with_batchnorms(build)``: ``build()`` under torch seed 0 (the global RNG is left as it was),
    its BatchNorms randomized (:func:`randomize_batchnorms`), in eval mode."""

    def seeded(build: Callable[[], nn.Module]) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return randomize_batchnorms(build())

    return seeded


def build_tiny_model(
    name: str,
    *,
    channels: int = 1,
    side: int = 8,
    classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A registry model with weights drawn from ``seed`` (the global RNG is left as it was), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TINY_MODELS[name](channels, side, classes)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_model() -> ModelFactory:
    """``tiny_model(name, channels=1, side=8, classes=10, seed=0, dtype=float32)``: see TINY_MODELS."""
    return build_tiny_model


@pytest.fixture
def rng() -> np.random.Generator:
    """Seeded numpy generator: every test sees the same draws."""
    return np.random.default_rng(0)


@pytest.fixture
def generator() -> torch.Generator:
    """Seeded torch CPU generator: every test sees the same draws."""
    return torch.Generator().manual_seed(0)


def hooks_left(model: nn.Module) -> list[str]:
    """Names of modules still carrying forward/backward hooks or an instance-level ``forward`` override."""
    left = []
    for name, module in model.named_modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
        hooks += (module._backward_pre_hooks,)
        if any(hooks) or "forward" in module.__dict__:
            left.append(name or "<root>")
    return left


@pytest.fixture(scope="session")
def assert_no_hooks() -> Callable[[nn.Module], None]:
    """``assert_no_hooks(model)`` fails naming the modules that still carry hooks."""

    def check(model: nn.Module) -> None:
        left = hooks_left(model)
        assert not left, f"hooks left on {left}"

    return check


@pytest.fixture(scope="session")
def count_hooks() -> Callable[[nn.Module], int]:
    """``count_hooks(model)``: modules carrying hooks (to show the hook check can see them)."""
    return lambda model: len(hooks_left(model))


@dataclass(frozen=True)
class Digits:
    """scikit-learn digits as (N, 1, 8, 8) tensors in [0, 1], split into train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@pytest.fixture(scope="session")
def digits() -> Digits:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1300], order[1300:]
    return Digits(x[train], y[train], x[test], y[test])


def _digits_cnn_architecture() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def train_on_digits(model: nn.Module, digits: Digits, epochs: int = 15) -> nn.Module:
    """``model`` trained on the training digits (Adam at 1e-2, batches of 64 shuffled by a seeded
    generator; the global RNG left as it was), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        shuffle = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            order = torch.randperm(len(digits.x_train), generator=shuffle)
            for start in range(0, len(order), 64):
                batch = order[start : start + 64]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(digits.x_train[batch]), digits.y_train[batch])
                loss.backward()
                optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_trainer() -> Callable[..., nn.Module]:
    """:func:`train_on_digits`, for tests that train a model of their own the way ``digits_cnn`` is."""
    return train_on_digits


@pytest.fixture(scope="session")
def digits_cnn(digits: Digits) -> nn.Module:
    """A small CNN trained 15 epochs on digits (about 1.5 s, 0.98 test accuracy). Tests must not train it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = train_on_digits(_digits_cnn_architecture(), digits)
    with torch.no_grad():
        accuracy = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert accuracy > 0.9, f"the digits CNN fixture reached only {accuracy:.3f} test accuracy"
    return model


@pytest.fixture(scope="session")
def digits_correct(digits: Digits, digits_cnn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 100 test images the digits CNN classifies correctly, with their labels."""
    with torch.no_grad():
        correct = digits_cnn(digits.x_test).argmax(1) == digits.y_test
    return digits.x_test[correct][:100], digits.y_test[correct][:100]


@pytest.fixture(scope="session")
def digits_unpadded() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A CNN whose first conv is unpadded (so a (mean, std) normalization folds into it exactly), trained
    on 1400 digits for a few seconds, and 96 held-out digits it classifies correctly. Tests must not train it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(72, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(15):
            for batch in torch.randperm(1400).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                optimizer.step()
    net.eval()
    x_test, y_test = x[1400:], y[1400:]
    with torch.no_grad():
        correct = net(x_test).argmax(1) == y_test
    return net, x_test[correct][:96], y_test[correct][:96]


class CountingModel(nn.Module):
    """Wraps a model and counts its forward calls (no hooks, so it cannot disturb the hook checks)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.fixture(scope="session")
def counting_model() -> type[CountingModel]:
    """``counting_model(model)`` counts forward calls: proves an error came before any work."""
    return CountingModel
