"""Run configuration: a TOML file (stdlib ``tomllib``) read into frozen dataclasses that validate themselves.

A run names its data set and sample, the model (a cached reference CNN, or a user's checkpoint and the
factory that builds its module), the attacks and detectors (registry names and parameters), the studies
(registry names and their parameters, ``[[studies]]``), the seed and the output directory.

One place for each fact: every default and every check of a value lives in the dataclass that holds it
(:class:`AttackSpec`, :class:`DetectorSpec`, :class:`ModelSpec`, :class:`RunConfig`, each study), which
refuses a bad value in ``__post_init__`` whether it comes from a file or from Python. :func:`parse_config`
only maps TOML keys to those fields: it refuses unknown keys and malformed tables, and names the file and
the dotted key in front of the dataclass's message.

Loading builds every attack and detector for the model, as the run will, without running any: a
misspelt or refused parameter is a :class:`ConfigError` naming the file, the entry, the parameter and
the nearest valid name, before the run spends any time. The output folder is taken from the current
directory, like any command-line tool; a relative ``checkpoint`` and the ``factory``'s module from the
config file's folder (where a user keeps them beside the TOML), the module then from ``sys.path``.
``evaluation/demo.toml`` is the documented example (and what ``xaiadv demo`` runs).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xaiadv.plugins import checks

from .data import DATASETS
from .studies import Study, default_studies, study_registry

DEMO_CONFIG = Path(__file__).with_name("demo.toml")
DEVICES = ("cpu", "cuda")


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and the key."""


# -------------------------------------------------------------------------------------------------
# the configuration: each dataclass validates itself; messages start with the field's (TOML) key


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _table(key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected a table, got {value!r}")
    return dict(value)


def _registered(kind: str, name: object, valid: Sequence[str], key: str = "name") -> str:
    """``name`` if it is one of ``valid`` registry names; else every valid name and the nearest one."""
    if name not in valid:
        near = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"{key}: unknown {kind} {name!r}; valid names: {', '.join(valid)}{hint}")
    return str(name)


def _attack_names() -> list[str]:
    from xaiadv.bridge.registry import available_attacks

    return available_attacks()


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a run: registry name, a label for the tables (default: the name), its parameters
    (checked against the attack when the config loads), an optional cap on the samples it attacks."""

    name: str
    label: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    samples: int | None = None

    def __post_init__(self) -> None:
        _registered("attack", self.name, _attack_names())
        object.__setattr__(self, "label", self.name if self.label is None else _string("label", self.label))
        object.__setattr__(self, "params", _table("params", self.params))
        if self.samples is not None:
            checks.positive_int("samples", self.samples)


@dataclass(frozen=True)
class DetectorSpec:
    """One detector of a run: a name from the detector registry, a label (default: the name), its parameters.

    ART's peer detectors are trained on adversarial examples of one attack: ``train_attack`` (a registry
    name) with ``train_params``, generated on ``train_samples`` training images.
    """

    name: str
    label: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    train_attack: str | None = None
    train_params: Mapping[str, Any] = field(default_factory=dict)
    train_samples: int = 1000

    def __post_init__(self) -> None:
        from .detector_study import detector_registry, is_trained_peer

        _registered("detector", self.name, sorted(detector_registry()))
        object.__setattr__(self, "label", self.name if self.label is None else _string("label", self.label))
        object.__setattr__(self, "params", _table("params", self.params))
        object.__setattr__(self, "train_params", _table("train_params", self.train_params))
        checks.positive_int("train_samples", self.train_samples)
        if not is_trained_peer(self.name):
            if self.train_attack is not None:
                raise ValueError("train_attack: only ART's trained detectors take one")
        elif self.train_attack is None:
            raise ValueError(
                f"train_attack: {self.name} is trained on adversarial examples; name the attack that makes "
                "them (e.g. 'art:FastGradientMethod')"
            )
        else:
            _registered("attack", self.train_attack, _attack_names(), "train_attack")


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

    def __post_init__(self) -> None:
        checks.positive_int("epochs", self.epochs)
        if self.max_train is not None:
            checks.positive_int("max_train", self.max_train)
        checks.positive_int("width", self.width)
        checks.natural_int("seed", self.seed)
        if (self.checkpoint is None) != (self.factory is None):
            raise ValueError(
                "checkpoint and factory go together (a state dict and the 'module:callable' that builds "
                "the module it fits); give both or neither"
            )
        if self.checkpoint is not None:
            _string("checkpoint", self.checkpoint)
        if self.factory is not None and ":" not in _string("factory", self.factory):
            raise ValueError(f"factory: expected 'package.module:callable', got {self.factory!r}")
        object.__setattr__(self, "factory_kwargs", _table("factory_kwargs", self.factory_kwargs))


#: Where a run's cells are computed (``[executor] kind``): here, one after another, or as Ray tasks.
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSpec:
    """Where the cells run: ``kind = "local"`` (in this process, the default) or ``"ray"`` (a task each).

    ``address``: the Ray cluster to join (``"auto"``, ``"host:port"`` or ``"ray://host:port"``); None starts a
    local Ray instance. ``num_cpus``/``num_gpus``: what each cell asks Ray for (fractional GPUs let several
    cells share one). ``max_retries``: how often Ray reruns a cell whose worker process died.
    """

    kind: str = "local"
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        checks.one_of("kind", self.kind, EXECUTORS)
        if self.address is not None:
            if self.kind != "ray":
                raise ValueError(f"address: only kind = 'ray' joins a cluster; kind is {self.kind!r}")
            ray_address(self.address)
        for key in ("num_cpus", "num_gpus"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{key}: expected a finite number >= 0, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("num_cpus: a cell needs some CPU or GPU; num_cpus and num_gpus are both 0")
        checks.natural_int("max_retries", self.max_retries)


def ray_address(address: object) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address, None for ``"auto"``; a ValueError naming ``address`` otherwise."""
    if address == "auto":
        return None
    text = _string("address", address).removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address: expected 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    return host, int(port)


#: The keys of the ``[data]`` table: RunConfig fields of the same names.
DATA_KEYS = ("dataset", "samples", "fit_samples", "calibration_samples", "fallback")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run; the same config and seed give the same results on CPU.

    Its checks name the TOML keys (``data.samples``) and the file (``source``), since a run config is a
    TOML file; built in Python it says ``<dict>``.
    ``calibration_samples``: clean test images after the sample on which our detectors' thresholds are set
    (none left: each detector holds out part of its fitting images instead).
    ``studies``: registered study objects with their parameters; default the attack and detector studies
    (:data:`~xaiadv.evaluation.studies.DEFAULT_STUDIES`). Attack cells run whatever the studies.
    ``name``: what the report's header calls the run (optional; names no result).
    ``executor``: where the cells are computed (:class:`ExecutorSpec`; names no result).
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
    studies: tuple[Study, ...] = field(default_factory=default_studies)
    name: str | None = None
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    source: str = "<dict>"
    folder: str = "."

    def __post_init__(self) -> None:
        with _located(self.source):
            self._check()

    def _check(self) -> None:
        checks.one_of("data.dataset", self.dataset, DATASETS)
        if self.fallback is not None:
            checks.one_of("data.fallback", self.fallback, DATASETS)
        for key in ("samples", "fit_samples", "calibration_samples"):
            checks.positive_int(f"data.{key}", getattr(self, key))
        _string("output", self.output)
        if self.name is not None:
            _string("name", self.name)
        checks.natural_int("seed", self.seed)
        checks.one_of("device", self.device, DEVICES)
        checks.positive_int("batch_size", self.batch_size)
        if not isinstance(self.model, ModelSpec):
            raise ValueError(f"model: expected a ModelSpec, got {type(self.model).__name__}")
        if not isinstance(self.executor, ExecutorSpec):
            raise ValueError(f"executor: expected an ExecutorSpec, got {type(self.executor).__name__}")
        if self.executor.kind == "ray" and self.device == "cuda" and self.executor.num_gpus == 0:
            raise ValueError(
                "executor.num_gpus: device = 'cuda' on Ray needs a GPU share per cell (e.g. num_gpus = 0.25)"
            )
        self._check_entries("attacks", AttackSpec, required=True)
        self._check_entries("detectors", DetectorSpec, required=False)
        self._check_entries("studies", Study, required=False)
        for index, study in enumerate(self.studies):
            try:
                study.check(self)
            except ValueError as error:
                raise ValueError(f"studies[{index}].{error}") from error

    def _check_entries(self, key: str, kind: type, *, required: bool) -> None:
        """The entries of ``key`` as a tuple of ``kind``, at least one when ``required``, labels unique."""
        entries = tuple(getattr(self, key))
        object.__setattr__(self, key, entries)
        if required and not entries:
            raise ValueError(f"{key}: a run needs at least one")
        wrong = [entry for entry in entries if not isinstance(entry, kind)]
        if wrong:
            raise ValueError(f"{key}: expected {kind.__name__} entries, got {wrong[0]!r}")
        names = [entry.name if kind is Study else entry.label for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            said = "labels must be unique" if kind is not Study else "each study once"
            raise ValueError(f"{key}: {said}; repeated: {repeated}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (the source file, its folder and the executor left out: they name no
        result; environment.json records the executor)."""
        data = asdict(self)
        data.pop("source")
        data.pop("folder")
        data.pop("executor")
        data["studies"] = [study.to_dict() for study in self.studies]
        return data


@contextmanager
def _located(source: str, prefix: str = "") -> Iterator[None]:
    """A ValueError inside, whose message starts with a key, becomes a ConfigError naming the file and
    the key's dotted path (``attacks[2].`` + ``samples must be ...``); a ConfigError passes unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: {prefix}{error}") from error


# -------------------------------------------------------------------------------------------------
# TOML -> the dataclasses: keys mapped, nothing else decided here

#: Top-level scalar keys: RunConfig fields of the same names. The tables: [data], [model], [[attacks]],
#: [[detectors]], [[studies]], [executor].
TOP_KEYS = ("name", "seed", "output", "device", "batch_size")
TABLES = ("data", "model", "attacks", "detectors", "studies", "executor")


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


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
    read = _Reader(source)
    read.keys(raw, {*TOP_KEYS, *TABLES}, "")
    data = read.table(raw, "data")
    read.keys(data, set(DATA_KEYS), "data.")
    read.required(raw, "output", "")
    read.required(data, "dataset", "data.")
    read.required(data, "samples", "data.")
    entries = {
        "attacks": tuple(
            read.spec(AttackSpec, entry, f"attacks[{i}]")
            for i, entry in enumerate(read.array(raw, "attacks"))
        ),
        "detectors": tuple(
            read.spec(DetectorSpec, entry, f"detectors[{i}]")
            for i, entry in enumerate(read.array(raw, "detectors", required=False))
        ),
        "model": _model(read, read.table(raw, "model", required=False), folder),
    }
    executor = read.table(raw, "executor", required=False)
    read.keys(executor, set(_field_names(ExecutorSpec)), "executor.")
    with _located(source, "executor."):
        entries["executor"] = ExecutorSpec(**executor)
    if "studies" in raw:
        entries["studies"] = _studies(read, raw["studies"])
    config = RunConfig(
        **read.present(raw, TOP_KEYS),
        **read.present(data, DATA_KEYS),
        **entries,
        source=source,
        folder=folder,
    )
    _check_buildable(read, config)
    return config


def _model(read: _Reader, model: Mapping[str, Any], folder: str) -> ModelSpec:
    """The [model] table; a relative checkpoint is taken from the config file's folder and must exist."""
    read.keys(model, set(_field_names(ModelSpec)), "model.")
    fields = read.present(model, _field_names(ModelSpec))
    given = fields.get("checkpoint")
    if isinstance(given, str):
        fields["checkpoint"] = os.path.abspath(os.path.join(folder, given))
    with _located(read.source, "model."):
        spec = ModelSpec(**fields)
    if spec.checkpoint is not None and not os.path.isfile(spec.checkpoint):
        where = (
            ""
            if os.path.isabs(given)
            else f" (a relative checkpoint is taken from the config file's folder, {folder})"
        )
        raise ConfigError(f"{read.source}: model.checkpoint: no file {spec.checkpoint}{where}")
    return spec


def _studies(read: _Reader, value: object) -> tuple[Study, ...]:
    """``[[studies]]`` entries: ``name`` (a registered study) and that study's own parameters."""
    if isinstance(value, Mapping):
        raise ConfigError(
            f"{read.source}: studies: the [studies] table is gone; name each study in its own "
            '[[studies]] entry with its parameters, e.g. [[studies]] name = "xaiadv:AttackStudy" '
            'equal_asr = [...], then [[studies]] name = "xaiadv:DetectorStudy"; leave [[studies]] out '
            "for both with their defaults (see evaluation/demo.toml)"
        )
    found = []
    for index, entry in enumerate(read.array({"studies": value}, "studies", required=False)):
        where = f"studies[{index}]"
        entry = read.mapping(entry, where)
        read.required(entry, "name", f"{where}.")
        registry = study_registry()
        with _located(read.source, f"{where}."):
            cls = registry[_registered("study", entry["name"], list(registry))]
        parameters = _field_names(cls)
        read.keys(entry, {"name", *parameters}, f"{where}.")
        with _located(read.source, f"{where}."):
            found.append(cls(**read.present(entry, parameters)))
    return tuple(found)


# -------------------------------------------------------------------------------------------------
# every attack and detector built for the model before the run spends any time


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Building models for the checks draws random weights; the caller's torch and numpy streams stay."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    np.random.set_state(numpy_state)


def _check_buildable(read: _Reader, config: RunConfig) -> None:
    """Build each attack, detector and peer's training attack for the model, as the run will."""
    from xaiadv.bridge.registry import art_classifier, check_attack

    from .detector_study import check_detector
    from .models import dataset_input_shape

    input_shape = dataset_input_shape(config.dataset)
    with _random_state_kept():
        model = _model_to_check(read, config)
        classifier = art_classifier(model, input_shape, (0.0, 1.0), None) if config.detectors else None
        for index, attack in enumerate(config.attacks):
            with _blamed(read, f"attacks[{index}]", attack.label, "params"):
                check_attack(attack.name, attack.params, model=model, input_shape=input_shape)
        for index, detector in enumerate(config.detectors):
            where = f"detectors[{index}]"
            with _blamed(read, where, detector.label, "params"):
                check_detector(detector, classifier)
            if detector.train_attack is not None:
                with _blamed(read, where, detector.label, "train_params"):
                    check_attack(
                        detector.train_attack, detector.train_params, model=model, input_shape=input_shape
                    )


@contextmanager
def _blamed(read: _Reader, where: str, label: str, key: str) -> Iterator[None]:
    """A :class:`ParameterError` inside becomes a ConfigError naming the file, entry, label and key."""
    from xaiadv.bridge.registry import ParameterError

    try:
        yield
    except ParameterError as error:
        named = key if error.parameter is None else f"{key}.{error.parameter}"
        raise ConfigError(f'{read.source}: {where} (label "{label}"): {named}: {error.reason}') from error


def _model_to_check(read: _Reader, config: RunConfig) -> nn.Module:
    """The model the run will attack, untrained: the reference CNN, or the user's factory's module."""
    from .models import import_factory, untrained_reference

    spec = config.model
    if spec.factory is None:
        return untrained_reference(config.dataset, spec.width).eval()
    try:
        factory = import_factory(spec.factory, Path(config.folder))
    except ValueError as error:
        raise ConfigError(f"{read.source}: model.factory: {error}") from error
    try:
        model = factory(**spec.factory_kwargs)
    except Exception as error:  # the user's factory raised: the config cannot build the model
        raise ConfigError(
            f"{read.source}: model.factory: {spec.factory}(**{dict(spec.factory_kwargs)}) raised "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{read.source}: model.factory: {spec.factory!r} returned {type(model).__name__}, "
            "not a torch module"
        )
    return model.eval()


@dataclass(frozen=True)
class _Reader:
    """The TOML side of a config: tables, arrays, required and unknown keys; errors name the file."""

    source: str

    def keys(self, table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise ConfigError(
                f"{self.source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                f"valid: {', '.join(sorted(prefix + k for k in allowed))}"
            )

    def required(self, table: Mapping[str, Any], key: str, prefix: str) -> None:
        if key not in table:
            raise ConfigError(f"{self.source}: missing key {prefix}{key}")

    def present(self, table: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
        """The given ones of ``keys``: what is left out takes the dataclass's default."""
        return {key: table[key] for key in keys if key in table}

    def mapping(self, value: object, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.source}: {key}: expected a table, got {value!r}")
        return value

    def table(self, raw: Mapping[str, Any], key: str, *, required: bool = True) -> Mapping[str, Any]:
        if key not in raw:
            if required:
                raise ConfigError(f"{self.source}: missing table [{key}]")
            return {}
        return self.mapping(raw[key], key)

    def array(self, raw: Mapping[str, Any], key: str, *, required: bool = True) -> list[Any]:
        value = raw.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: missing [[{key}]]: a run needs at least one")
            return []
        if not isinstance(value, list) or (required and not value):
            raise ConfigError(f"{self.source}: {key}: expected an array of tables ([[{key}]]), got {value!r}")
        return value

    def spec(self, cls: type, entry: object, where: str) -> Any:
        """One ``[[attacks]]`` or ``[[detectors]]`` entry as ``cls``: its keys are the fields' names."""
        entry = self.mapping(entry, where)
        self.keys(entry, set(_field_names(cls)), f"{where}.")
        self.required(entry, "name", f"{where}.")
        with _located(self.source, f"{where}."):
            return cls(**entry)
