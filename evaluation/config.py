"""Run configuration: a TOML file (stdlib ``tomllib``) read into a frozen dataclass that validates itself.

A run names its data set and sample, the model (a cached reference CNN, or a user's checkpoint and the
factory that builds its module), the attacks and detectors (registry names and parameters), the studies,
the seed and the output directory. Every error names the key and the file.

Loading builds every attack and detector for the model, as the run will, without running any: a
misspelt or refused parameter is a :class:`ConfigError` naming the file, the entry, the parameter and
the nearest valid name, before the run spends any time. The output folder is taken from the current
directory, like any command-line tool; a relative ``checkpoint`` and the ``factory``'s module from the
config file's folder (where a user keeps them beside the TOML), the module then from ``sys.path``.
``evaluation/demo.toml`` is the documented example (and what ``xaiadv demo`` runs).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import DATASETS

DEMO_CONFIG = Path(__file__).with_name("demo.toml")

#: Detectors the harness runs: ours as ART detectors, and ART's own two trained detectors as peers.
DETECTORS = (
    "xaiadv:SpatialEntropyDetector",
    "xaiadv:IDefender",
    "xaiadv:KNNDetector",
    "art:BinaryInputDetector",
    "art:BinaryActivationDetector",
)
STUDIES = ("xaiadv:AttackStudy", "xaiadv:DetectorStudy")
DEVICES = ("cpu", "cuda")


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a run: registry name, a label for the tables, its parameters, an optional sample cap."""

    name: str
    label: str
    params: Mapping[str, Any] = field(default_factory=dict)
    samples: int | None = None


@dataclass(frozen=True)
class DetectorSpec:
    """One detector of a run: a name from :data:`DETECTORS`, a label and its parameters.

    ART's peer detectors are trained on adversarial examples of one attack: ``train_attack`` (a registry
    name) with ``train_params``, generated on ``train_samples`` training images.
    """

    name: str
    label: str
    params: Mapping[str, Any] = field(default_factory=dict)
    train_attack: str | None = None
    train_params: Mapping[str, Any] = field(default_factory=dict)
    train_samples: int = 1000


@dataclass(frozen=True)
class ModelSpec:
    """A cached reference CNN trained with ``epochs``/``max_train``/``width``/``seed``, or a user's model:
    ``checkpoint`` (a .safetensors state dict) loaded into ``factory(**factory_kwargs)`` ("module:callable").
    """

    epochs: int = 2
    max_train: int | None = 30_000
    width: int = 32
    seed: int = 0
    checkpoint: str | None = None
    factory: str | None = None
    factory_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run; the same config and seed give the same results on CPU.

    ``calibration_samples``: clean test images after the sample on which our detectors' thresholds are set
    (none left: each detector holds out part of its fitting images instead).
    ``equal_asr``: the attack labels compared at equal ASR (thesis Table 5.1); empty means all of them. An
    attack that rarely succeeds would otherwise pull the common ASR down to where nothing is compared.
    ``folder``: the config file's folder (absolute), where the model factory's module is looked for.
    """

    dataset: str
    samples: int
    output: str
    attacks: tuple[AttackSpec, ...]
    detectors: tuple[DetectorSpec, ...] = ()
    model: ModelSpec = field(default_factory=ModelSpec)
    fallback: str | None = None
    fit_samples: int = 10_000
    calibration_samples: int = 1000
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 128
    studies: tuple[str, ...] = STUDIES
    equal_asr: tuple[str, ...] = ()
    source: str = "<dict>"
    folder: str = "."

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (the source file and its folder left out: they name no result)."""
        data = asdict(self)
        data.pop("source")
        data.pop("folder")
        return data


_TOP_KEYS = {
    "name",
    "seed",
    "output",
    "device",
    "batch_size",
    "data",
    "model",
    "attacks",
    "detectors",
    "studies",
}
_DATA_KEYS = {"dataset", "samples", "fit_samples", "calibration_samples", "fallback"}
_MODEL_KEYS = {"epochs", "max_train", "width", "seed", "checkpoint", "factory", "factory_kwargs"}
_ATTACK_KEYS = {"name", "label", "params", "samples"}
_DETECTOR_KEYS = {"name", "label", "params", "train_attack", "train_params", "train_samples"}
_STUDY_KEYS = {"attacks", "detectors", "equal_asr"}


def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read and validate a TOML run config; ``overrides`` replace top-level keys (the CLI's options)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: no such config file") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from error
    return parse_config({**raw, **(overrides or {})}, source=str(path), folder=path.parent)


def parse_config(raw: Mapping[str, Any], *, source: str = "<dict>", folder: str | Path = ".") -> RunConfig:
    """Validate a config given as a dict (the parsed TOML); errors name ``source`` and the key.

    ``folder``: where a relative checkpoint and the factory's module are (a config file's folder).
    """
    folder = os.path.abspath(folder)
    check = _Checker(source)
    check.keys(raw, _TOP_KEYS, "")
    data = check.table(raw, "data")
    check.keys(data, _DATA_KEYS, "data.")
    model = check.table(raw, "model", required=False)
    check.keys(model, _MODEL_KEYS, "model.")
    studies = check.table(raw, "studies", required=False)
    check.keys(studies, _STUDY_KEYS, "studies.")
    dataset = check.choice(data, "dataset", DATASETS, "data.")
    fallback = data.get("fallback")
    if fallback is not None:
        fallback = check.choice(data, "fallback", DATASETS, "data.")
    attacks = tuple(_attack(check, entry, i) for i, entry in enumerate(check.array(raw, "attacks")))
    detectors = tuple(
        _detector(check, entry, i) for i, entry in enumerate(check.array(raw, "detectors", required=False))
    )
    _unique_labels(check, [a.label for a in attacks], "attacks")
    _unique_labels(check, [d.label for d in detectors], "detectors")
    config = RunConfig(
        dataset=dataset,
        samples=check.positive_int(data, "samples", "data."),
        output=check.string(raw, "output", ""),
        attacks=attacks,
        detectors=detectors,
        model=_model(check, model, folder),
        fallback=fallback,
        fit_samples=check.positive_int(data, "fit_samples", "data.", default=10_000),
        calibration_samples=check.positive_int(data, "calibration_samples", "data.", default=1000),
        seed=check.natural_int(raw, "seed", "", default=0),
        device=check.choice(raw, "device", DEVICES, "", default="cpu"),
        batch_size=check.positive_int(raw, "batch_size", "", default=128),
        studies=tuple(
            name
            for name, key in zip(STUDIES, ("attacks", "detectors"), strict=True)
            if check.boolean(studies, key, "studies.", default=True)
        ),
        equal_asr=_equal_asr(check, studies, [a.label for a in attacks]),
        source=source,
        folder=folder,
    )
    _check_buildable(check, config)
    return config


def _attack(check: _Checker, entry: object, index: int) -> AttackSpec:
    prefix = f"attacks[{index}]."
    entry = check.mapping(entry, prefix[:-1])
    check.keys(entry, _ATTACK_KEYS, prefix)
    name = check.string(entry, "name", prefix)
    _known_attack(check, name, prefix + "name")
    samples = entry.get("samples")
    return AttackSpec(
        name=name,
        label=check.string(entry, "label", prefix, default=name),
        params=dict(check.table(entry, "params", required=False, prefix=prefix)),
        samples=None if samples is None else check.positive_int(entry, "samples", prefix),
    )


def _detector(check: _Checker, entry: object, index: int) -> DetectorSpec:
    prefix = f"detectors[{index}]."
    entry = check.mapping(entry, prefix[:-1])
    check.keys(entry, _DETECTOR_KEYS, prefix)
    name = check.choice(entry, "name", DETECTORS, prefix)
    train_attack = entry.get("train_attack")
    if name.startswith("art:"):
        if train_attack is None:
            raise ConfigError(
                f"{check.source}: {prefix}train_attack: {name} is trained on adversarial examples; "
                "name the attack that makes them (e.g. 'art:FastGradientMethod')"
            )
        _known_attack(check, check.string(entry, "train_attack", prefix), prefix + "train_attack")
    elif train_attack is not None:
        raise ConfigError(f"{check.source}: {prefix}train_attack: only ART's trained detectors take one")
    return DetectorSpec(
        name=name,
        label=check.string(entry, "label", prefix, default=name),
        params=dict(check.table(entry, "params", required=False, prefix=prefix)),
        train_attack=train_attack,
        train_params=dict(check.table(entry, "train_params", required=False, prefix=prefix)),
        train_samples=check.positive_int(entry, "train_samples", prefix, default=1000),
    )


def _model(check: _Checker, model: Mapping[str, Any], folder: str) -> ModelSpec:
    checkpoint, factory = model.get("checkpoint"), model.get("factory")
    if (checkpoint is None) != (factory is None):
        raise ConfigError(
            f"{check.source}: model.checkpoint and model.factory go together (a state dict and the "
            "'module:callable' that builds the module it fits); give both or neither"
        )
    if factory is not None and ":" not in check.string(model, "factory", "model."):
        raise ConfigError(
            f"{check.source}: model.factory: expected 'package.module:callable', got {factory!r}"
        )
    max_train = model.get("max_train", 30_000)
    return ModelSpec(
        epochs=check.positive_int(model, "epochs", "model.", default=2),
        max_train=None
        if max_train is None
        else check.positive_int(model, "max_train", "model.", default=30_000),
        width=check.positive_int(model, "width", "model.", default=32),
        seed=check.natural_int(model, "seed", "model.", default=0),
        checkpoint=None if checkpoint is None else _checkpoint(check, model, folder),
        factory=factory,
        factory_kwargs=dict(check.table(model, "factory_kwargs", required=False, prefix="model.")),
    )


def _checkpoint(check: _Checker, model: Mapping[str, Any], folder: str) -> str:
    """The checkpoint's absolute path, a relative one taken from the config file's folder; it must exist."""
    given = check.string(model, "checkpoint", "model.")
    path = os.path.abspath(os.path.join(folder, given))
    if not os.path.isfile(path):
        where = (
            ""
            if os.path.isabs(given)
            else (f" (a relative checkpoint is taken from the config file's folder, {folder})")
        )
        raise ConfigError(f"{check.source}: model.checkpoint: no file {path}{where}")
    return path


def _equal_asr(check: _Checker, studies: Mapping[str, Any], labels: list[str]) -> tuple[str, ...]:
    chosen = studies.get("equal_asr", [])
    if not isinstance(chosen, list) or not all(isinstance(label, str) for label in chosen):
        raise check.fail("studies.equal_asr", "a list of attack labels", chosen)
    unknown = [label for label in chosen if label not in labels]
    if unknown:
        raise ConfigError(
            f"{check.source}: studies.equal_asr: {unknown} are not attack labels of this run; "
            f"valid: {', '.join(labels)}"
        )
    return tuple(chosen)


def _known_attack(check: _Checker, name: str, key: str) -> None:
    from xaiadv.bridge.registry import available_attacks

    valid = available_attacks()
    if name not in valid:
        raise ConfigError(f"{check.source}: {key}: unknown attack {name!r}; valid names: {', '.join(valid)}")


def _unique_labels(check: _Checker, labels: list[str], key: str) -> None:
    seen = {label for label in labels if labels.count(label) > 1}
    if seen:
        raise ConfigError(f"{check.source}: {key}: labels must be unique; repeated: {sorted(seen)}")


# -------------------------------------------------------------------------------------------------
# every attack and detector built for the model before the run spends any time


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Building models for the checks draws random weights; the caller's torch and numpy streams stay."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    np.random.set_state(numpy_state)


def _check_buildable(check: _Checker, config: RunConfig) -> None:
    """Build each attack, detector and peer's training attack for the model, as the run will."""
    from xaiadv.bridge.registry import art_classifier, check_attack

    from .detector_study import check_detector
    from .models import dataset_input_shape

    input_shape = dataset_input_shape(config.dataset)
    with _random_state_kept():
        model = _model_to_check(check, config)
        classifier = art_classifier(model, input_shape, (0.0, 1.0), None) if config.detectors else None
        for index, attack in enumerate(config.attacks):
            with _blamed(check, f"attacks[{index}]", attack.label, "params"):
                check_attack(attack.name, attack.params, model=model, input_shape=input_shape)
        for index, detector in enumerate(config.detectors):
            where = f"detectors[{index}]"
            with _blamed(check, where, detector.label, "params"):
                check_detector(detector, classifier)
            if detector.train_attack is not None:
                with _blamed(check, where, detector.label, "train_params"):
                    check_attack(
                        detector.train_attack, detector.train_params, model=model, input_shape=input_shape
                    )


@contextmanager
def _blamed(check: _Checker, where: str, label: str, key: str) -> Iterator[None]:
    """A :class:`ParameterError` inside becomes a ConfigError naming the file, entry, label and key."""
    from xaiadv.bridge.registry import ParameterError

    try:
        yield
    except ParameterError as error:
        named = key if error.parameter is None else f"{key}.{error.parameter}"
        raise ConfigError(f'{check.source}: {where} (label "{label}"): {named}: {error.reason}') from error


def _model_to_check(check: _Checker, config: RunConfig) -> nn.Module:
    """The model the run will attack, untrained: the reference CNN, or the user's factory's module."""
    from .models import import_factory, untrained_reference

    spec = config.model
    if spec.factory is None:
        return untrained_reference(config.dataset, spec.width).eval()
    try:
        factory = import_factory(spec.factory, Path(config.folder))
    except ValueError as error:
        raise ConfigError(f"{check.source}: model.factory: {error}") from error
    try:
        model = factory(**spec.factory_kwargs)
    except Exception as error:  # the user's factory raised: the config cannot build the model
        raise ConfigError(
            f"{check.source}: model.factory: {spec.factory}(**{dict(spec.factory_kwargs)}) raised "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{check.source}: model.factory: {spec.factory!r} returned {type(model).__name__}, "
            "not a torch module"
        )
    return model.eval()


@dataclass(frozen=True)
class _Checker:
    """Typed reads of config values; every error names the file and the dotted key."""

    source: str

    def fail(self, key: str, expected: str, value: object) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: expected {expected}, got {value!r}")

    def keys(self, table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise ConfigError(
                f"{self.source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                f"valid: {', '.join(sorted(prefix + k for k in allowed))}"
            )

    def mapping(self, value: object, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, "a table", value)
        return value

    def table(
        self, raw: Mapping[str, Any], key: str, *, required: bool = True, prefix: str = ""
    ) -> Mapping[str, Any]:
        if key not in raw:
            if required:
                raise ConfigError(f"{self.source}: missing table [{prefix}{key}]")
            return {}
        return self.mapping(raw[key], prefix + key)

    def array(self, raw: Mapping[str, Any], key: str, *, required: bool = True) -> list[Any]:
        value = raw.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: missing [[{key}]]: a run needs at least one")
            return []
        if not isinstance(value, list) or (required and not value):
            raise self.fail(key, "an array of tables ([[" + key + "]])", value)
        return value

    def get(self, raw: Mapping[str, Any], key: str, prefix: str, default: object) -> object:
        if key in raw:
            return raw[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self.source}: missing key {prefix}{key}")
        return default

    def string(self, raw: Mapping[str, Any], key: str, prefix: str, default: object = None) -> str:
        value = self.get(raw, key, prefix, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(prefix + key, "a non-empty string", value)
        return value

    def choice(
        self, raw: Mapping[str, Any], key: str, choices: tuple[str, ...], prefix: str, default: object = None
    ) -> str:
        value = self.get(raw, key, prefix, _REQUIRED if default is None else default)
        if value not in choices:
            raise self.fail(prefix + key, f"one of {', '.join(choices)}", value)
        return str(value)

    def positive_int(self, raw: Mapping[str, Any], key: str, prefix: str, default: object = None) -> int:
        value = self.get(raw, key, prefix, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(prefix + key, "an integer > 0", value)
        return value

    def natural_int(self, raw: Mapping[str, Any], key: str, prefix: str, default: int) -> int:
        value = self.get(raw, key, prefix, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(prefix + key, "an integer >= 0", value)
        return value

    def boolean(self, raw: Mapping[str, Any], key: str, prefix: str, default: bool) -> bool:
        value = self.get(raw, key, prefix, default)
        if not isinstance(value, bool):
            raise self.fail(prefix + key, "true or false", value)
        return value


_REQUIRED = object()
