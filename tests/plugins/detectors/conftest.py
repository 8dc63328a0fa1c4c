"""Fixtures shared by the detector tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def small_relu_net() -> nn.Sequential:
    """conv -> ReLU -> conv -> ReLU -> linear in float64 on 2 x 6 x 6 inputs (seeded, eval mode): small enough
    for guided-backprop references written out by hand."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 5),
        )
    return model.double().eval()
