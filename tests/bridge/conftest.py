"""Fixtures shared by the ART adapter and registry tests (test_art.py, test_registry.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contending ones; the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Mixed:
    """Test digits the CNN gets right followed by every one it gets wrong: labels and predictions differ."""

    x: torch.Tensor
    label: torch.Tensor
    prediction: torch.Tensor
    wrong: torch.Tensor


@pytest.fixture(scope="session")
def mixed_digits(digits, digits_cnn: nn.Module) -> Mixed:
    with torch.no_grad():
        prediction = digits_cnn(digits.x_test).argmax(1)
    wrong = prediction != digits.y_test
    rows = torch.cat([(~wrong).nonzero().squeeze(1)[:24], wrong.nonzero().squeeze(1)])
    mixed = Mixed(digits.x_test[rows], digits.y_test[rows], prediction[rows], wrong[rows])
    assert int(mixed.wrong.sum()) >= 3, "the digits CNN fixture should misclassify a few test digits"
    return mixed
