"""What every adapter shares: the table of attack classes, the plugin call, and the missing-library error."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch

from xaiadv.plugins.attacks import (
    ATTACK_PARAMS,
    PATTERNS,
    AttackConfig,
    AttackResult,
    AttackTrace,
    make_config,
    run_attack,
)
from xaiadv.plugins.model import Classifier

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class AttackEntry:
    """One public attack class: its name, the plugin pattern it runs, and what it does (for docstrings)."""

    name: str
    pattern: str
    summary: str
    note: str = ""


#: The four attack classes every adapter exposes, in one place.
ATTACK_TABLE: tuple[AttackEntry, ...] = (
    AttackEntry(
        "LRPFlip",
        "flip",
        "LRP-flip / batch-flip (thesis Algorithms 3-5): reflects the most relevant values about the bounds' "
        "midpoint",
    ),
    AttackEntry(
        "LRPMean",
        "mean",
        "LRP-mean (thesis Algorithm 6): moves the most relevant values to their channel mean",
    ),
    AttackEntry(
        "LRPGrad",
        "grad",
        "LRP-grad (thesis Algorithm 7): IFGSM steps on the most relevant values",
        "With n_batch=1.0 (every value) it is IFGSM: ART's BasicIterativeMethod without projection.",
    ),
    AttackEntry(
        "LRPGradMean",
        "grad_mean",
        "LRP-grad+mean (thesis 5.2.1): LRP-grad, with LRP-mean where a sample's gradient vanishes",
    ),
)
#: Public class name -> plugin pattern name.
ATTACK_CLASSES: dict[str, str] = {entry.name: entry.pattern for entry in ATTACK_TABLE}


def attack_classes(
    base: T, library: str, *, hidden: Sequence[str] = (), own: Sequence[str] = ()
) -> tuple[T, ...]:
    """The adapter's four classes from :data:`ATTACK_TABLE`: subclasses of ``base`` naming their pattern,
    with docstrings built from the pattern's parameters (less ``hidden``, which the library decides
    elsewhere, plus the adapter's ``own``), in the table's order."""
    classes = []
    for entry in ATTACK_TABLE:
        targeting = "targeted or not" if PATTERNS[entry.pattern].supports_targeted else "untargeted"
        parameters = [name for name in attack_params(entry.pattern) if name not in hidden] + list(own)
        doc = f"{entry.summary}; {library}, {targeting}.\n\nParameters: {', '.join(parameters)}."
        if entry.note:
            doc += f" {entry.note}"
        namespace = {"pattern": entry.pattern, "__doc__": doc, "__module__": base.__module__}
        cls = type(entry.name, (base,), namespace)
        cls.__qualname__ = entry.name
        classes.append(cls)
    return tuple(classes)


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
    pattern_name: str, classifier: Classifier, x: torch.Tensor, y: Any, *, config: AttackConfig
) -> AttackResult:
    """Run one plugin attack; inputs are torch tensors on the model's device."""
    return run_attack(PATTERNS[pattern_name](), classifier, x, y, config=config)


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
