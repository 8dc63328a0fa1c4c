"""Temporary changes of a model's train/eval mode, undone per module even after an exception."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Every module's own train/eval flag put back on exit (``model.train(flag)`` would also flip
    submodules the caller froze on purpose, such as a BatchNorm kept in eval inside a training model)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block, every module's flag restored after."""
    with modes_restored(model):
        model.eval()
        yield model
