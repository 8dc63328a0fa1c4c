"""What every adapter shares: the attack names, the plugin call, and the missing-library error."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
from torch import nn

from xaiadv.plugins.attacks import (
    ATTACK_PARAMS,
    PATTERNS,
    AttackConfig,
    AttackResult,
    AttackTrace,
    make_config,
    run_attack,
)

#: Public class name -> plugin pattern name. Every adapter exposes these four classes.
ATTACK_CLASSES: dict[str, str] = {
    "LRPFlip": "flip",
    "LRPMean": "mean",
    "LRPGrad": "grad",
    "LRPGradMean": "grad_mean",
}


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the pip extra providing it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"xaiadv's {extra} adapters need the '{module}' package: pip install 'xaiadv[{extra}]'"
        ) from error


def attack_params(pattern_name: str) -> dict[str, Any]:
    """The plugin parameters (and defaults) of one attack, e.g. for ``attack_params`` lists."""
    return dict(ATTACK_PARAMS[pattern_name])


def build_config(pattern_name: str, params: dict[str, Any]) -> AttackConfig:
    """Validate parameters once, in the plugin's own config (the one validator every adapter uses)."""
    return make_config(pattern_name, **params)


def run_plugin(
    pattern_name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    *,
    bounds: tuple[float, float],
    preprocessing: Any,
    config: AttackConfig,
) -> AttackResult:
    """Run one plugin attack; inputs are torch tensors on the model's device."""
    return run_attack(
        PATTERNS[pattern_name](), model, x, y, bounds=bounds, preprocessing=preprocessing, config=config
    )


def concat_results(results: list[AttackResult], x: torch.Tensor) -> AttackResult:
    """One AttackResult from the results of consecutive mini-batches (an empty list gives an empty result)."""
    if not results:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return AttackResult(x.detach().clone(), empty.bool(), empty, empty)
    traces = [result.trace for result in results]
    trace = None
    if all(item is not None for item in traces):
        fields = AttackTrace.__dataclass_fields__
        trace = AttackTrace(**{key: torch.cat([getattr(item, key) for item in traces], 1) for key in fields})
    return AttackResult(
        x_adv=torch.cat([result.x_adv for result in results]),
        success=torch.cat([result.success for result in results]),
        iterations=torch.cat([result.iterations for result in results]),
        original_class=torch.cat([result.original_class for result in results]),
        trace=trace,
    )
