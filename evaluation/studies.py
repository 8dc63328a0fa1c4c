"""The study registry: every study a run config can name in ``[[studies]]``, filled by a decorator.

A study is a frozen dataclass whose fields are its parameters (the keys of its ``[[studies]]`` entry
beside ``name``) and which validates them itself. It reads the run's attack cells and adds its own
tables or cells through :class:`~xaiadv.evaluation.run.Run` (``run.cell`` for anything resumable).
Each study lives beside the code it drives (``@studies.register("xaiadv:AttackStudy")`` in
``attack_study.py``); :func:`study_registry` imports those modules, which fills the registry, the way
Zennit's ``register_composite`` fills its composite table. ``xaiadv list`` prints it.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from xaiadv.bridge.registry import Registry

if TYPE_CHECKING:
    from .config import RunConfig
    from .run import Run

#: Every study by registry name (``source:Name``) -> its class.
studies = Registry("study")

#: The studies a run config without ``[[studies]]`` entries runs, with their default parameters.
DEFAULT_STUDIES = ("xaiadv:AttackStudy", "xaiadv:DetectorStudy")


@dataclass(frozen=True)
class Study(abc.ABC):
    """What every study shares: its registry name, a check against the run's config, its cells.

    A subclass validates its own fields in ``__post_init__`` (a ValueError whose message starts with
    the field's name) and implements :meth:`run`.
    """

    @property
    def name(self) -> str:
        """The name this study's class is registered under."""
        return next(name for name, cls in study_registry().items() if cls is type(self))

    def check(self, config: RunConfig) -> None:
        """Refuse parameters that do not fit the rest of ``config`` (e.g. labels of no attack); by default
        a study's fields need nothing from the rest of the config."""
        del config

    def cell_count(self, config: RunConfig) -> int:
        """How many cells the study adds to the run (the count Ctrl-C reports finished of)."""
        return 0

    @abc.abstractmethod
    def run(self, run: Run) -> None:
        """Compute the study over the run's finished attack cells; write into ``run.results``."""

    def to_dict(self) -> dict[str, Any]:
        """The ``[[studies]]`` entry this study was read from: its name and parameters."""
        return {"name": self.name, **asdict(self)}


def study_registry() -> Registry:
    """The study registry, filled: importing the modules that hold the studies registers them."""
    from . import (  # noqa: F401  (@studies.register)
        attack_study,
        detector_study,
        heatmap_study,
        retraining_study,
        signature_study,
        transfer_study,
        vanishing_study,
    )

    return studies


def default_studies() -> tuple[Study, ...]:
    """:data:`DEFAULT_STUDIES` with their default parameters."""
    registry = study_registry()
    return tuple(registry[name]() for name in DEFAULT_STUDIES)


def attack_labels(key: str, value: object) -> tuple[str, ...]:
    """A study parameter naming attacks by label (a list of strings) as a tuple; ValueError naming ``key``."""
    if not isinstance(value, list | tuple) or not all(isinstance(label, str) for label in value):
        raise ValueError(f"{key}: expected a list of attack labels, got {value!r}")
    return tuple(value)


def check_attack_labels(key: str, labels: Sequence[str], config: RunConfig) -> None:
    """Refuse labels in ``labels`` that name no attack of ``config``, listing the valid ones."""
    valid = [attack.label for attack in config.attacks]
    unknown = [label for label in labels if label not in valid]
    if unknown:
        raise ValueError(f"{key}: {unknown} are not attack labels of this run; valid: {', '.join(valid)}")


def chosen_attacks(labels: Sequence[str], config: RunConfig) -> list[str]:
    """The attack labels a study covers: ``labels`` in the config's order, or all when empty."""
    return [spec.label for spec in config.attacks if not labels or spec.label in labels]
