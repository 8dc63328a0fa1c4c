"""One naming scheme for every attack: ours and the reference attacks of ART, Foolbox and torchattacks.

``available_attacks()`` lists ``source:Name`` strings (``xaiadv:LRPGrad``, ``art:BasicIterativeMethod``,
``foolbox:LinfPGD``, ``torchattacks:PGD``); ``build_attack(name, model=..., bounds=..., preprocessing=...,
**params)`` returns a :class:`BuiltAttack`, one uniform callable ``(x, y) -> x_adv`` on torch tensors.
``check_attack(name, params, model=..., input_shape=...)`` builds the attack as a run would without running
it, and raises a :class:`ParameterError` that names the parameter at fault. The libraries are used
through their public APIs only; nothing is patched. A source whose library is not installed is simply
absent from the list.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.attacks import AttackResult
from xaiadv.plugins.checks import check_bounds
from xaiadv.plugins.model import Classifier
from xaiadv.plugins.modes import modes_restored

from ._common import ATTACK_CLASSES, attack_params, build_config, run_plugin

#: Our attacks by registry name -> plugin pattern (IFGSMNoise is thesis Algorithm 8, a reference variant).
XAIADV_ATTACKS: dict[str, str] = {**ATTACK_CLASSES, "IFGSMNoise": "ifgsm_noise"}
#: Detector-aware PGD (plugins/adaptive.py): built with a fitted detector (``detector=``), not a pattern.
DETECTOR_AWARE = "DetectorAwarePGD"
SOURCES = ("xaiadv", "art", "foolbox", "torchattacks")
#: ART attacks whose estimator requirements would admit a PyTorchClassifier but which attack another kind of
#: estimator: object detectors (their requirements are empty), or TensorFlow models.
ART_EXCLUDED = frozenset({"OverloadPyTorch", "SNAL"})
#: Foolbox takes the budget at call time, not in the constructor; the registry takes it among the params.
FOOLBOX_CALL_PARAMS = ("epsilons",)


T = TypeVar("T")


class Registry(Mapping[str, Any]):
    """Names (``source:Name``) to what they build, filled by the :meth:`register` decorator.

    ``detectors`` (here) holds every detector a run config can name; the evaluation's study registry is
    another instance. Registering a name twice is an error, so two definitions cannot shadow each other.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@detectors.register("xaiadv:KNNDetector")`` above a class or factory."""
        if name.count(":") != 1 or not all(name.partition(":")[::2]):
            raise ValueError(f"name: expected 'source:Name', got {name!r}")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self._entries)}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


#: Every detector a run can name: ours (``bridge/art_detectors.py``) and ART's peers (the evaluation's).
detectors = Registry("detector")


@dataclass
class BuiltAttack:
    """A uniform attack callable: ``attack(x, y) -> x_adv`` with x a torch batch, y class indices (N,).

    ``last_result`` holds our plugin's AttackResult after an ``xaiadv:`` attack (None for the libraries').
    """

    name: str
    params: dict[str, Any]
    run: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = field(repr=False)
    last_result: AttackResult | None = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(x, y)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@cache
def _art_attacks() -> dict[str, type]:
    """ART evasion attacks that accept a PyTorchClassifier (by their estimator requirements)."""
    if not _installed("art"):
        return {}
    import art.attacks.evasion as evasion
    from art.attacks.attack import EvasionAttack
    from art.estimators.classification import PyTorchClassifier

    found = {}
    for name, cls in vars(evasion).items():
        if name in ART_EXCLUDED or "TensorFlow" in name:
            continue
        is_attack = inspect.isclass(cls) and issubclass(cls, EvasionAttack) and not inspect.isabstract(cls)
        if is_attack and _accepts(PyTorchClassifier, cls._estimator_requirements or ()):
            found[name] = cls
    return found


def _accepts(estimator_cls: type, requirements: tuple[Any, ...]) -> bool:
    """ART's estimator check against a class: every requirement (a class or a union tuple) is in its MRO."""
    mro = estimator_cls.__mro__
    return all(
        any(option in mro for option in (req if isinstance(req, tuple) else (req,))) for req in requirements
    )


@cache
def _foolbox_attacks() -> dict[str, type]:
    """Concrete Foolbox attacks under every public name (aliases such as LinfPGD included)."""
    if not _installed("foolbox"):
        return {}
    import foolbox.attacks as attacks
    from foolbox.attacks.base import Attack

    return {
        name: cls
        for name, cls in vars(attacks).items()
        if inspect.isclass(cls)
        and issubclass(cls, Attack)
        and not inspect.isabstract(cls)
        and name[0].isupper()
    }


@cache
def _torchattacks_attacks() -> dict[str, type]:
    """torchattacks attacks listed in its ``__all__`` that attack a single model (wrappers excluded)."""
    if not _installed("torchattacks"):
        return {}
    import torchattacks
    from torchattacks.attack import Attack

    wrappers = {"MultiAttack", "LGV"}
    return {
        name: getattr(torchattacks, name)
        for name in torchattacks.__all__
        if name not in wrappers
        and inspect.isclass(getattr(torchattacks, name, None))
        and issubclass(getattr(torchattacks, name), Attack)
    }


def _library_attacks(source: str) -> dict[str, type]:
    return {"art": _art_attacks, "foolbox": _foolbox_attacks, "torchattacks": _torchattacks_attacks}[source]()


def available_attacks(source: str | None = None) -> list[str]:
    """Every attack as ``source:Name``, sorted; ``source`` limits the list to one of SOURCES."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    names = [f"xaiadv:{name}" for name in (*XAIADV_ATTACKS, DETECTOR_AWARE)]
    for library in SOURCES[1:]:
        names += [f"{library}:{name}" for name in _library_attacks(library)]
    return sorted(name for name in names if source is None or name.startswith(f"{source}:"))


def build_attack(
    name: str,
    *,
    model: nn.Module,
    bounds: tuple[float, float] = (0.0, 1.0),
    preprocessing: tuple[Any, Any] | None = None,
    **params: Any,
) -> BuiltAttack:
    """Build one attack by registry name as a uniform ``(x, y) -> x_adv`` callable.

    model: a torch module returning logits for inputs normalized by ``preprocessing=(mean, std)``
    (per channel); bounds: the raw inputs' range; params: the attack's own parameters. For Foolbox
    attacks, ``epsilons`` (a float) is the budget of fixed-epsilon attacks and the clipping bound of
    minimization attacks (default None: unbounded).
    """
    source, _, attack_name = name.partition(":")
    valid = available_attacks()
    if name not in valid:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(valid)}")
    checks.module("model", model)
    bounds = check_bounds(bounds)
    builder = {
        "xaiadv": _build_xaiadv,
        "art": _build_art,
        "foolbox": _build_foolbox,
        "torchattacks": _build_torchattacks,
    }[source]
    return builder(attack_name, model, bounds, preprocessing, dict(params))


def _build_xaiadv(
    name: str, model: nn.Module, bounds: tuple[float, float], preprocessing: Any, params: dict[str, Any]
) -> BuiltAttack:
    if name == DETECTOR_AWARE:
        return _build_detector_aware(model, bounds, preprocessing, params)
    pattern = XAIADV_ATTACKS[name]
    config = build_config(pattern, params)
    classifier = Classifier(model, bounds, preprocessing)

    def run(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        result = run_plugin(pattern, classifier, x, y, config=config)
        built.last_result = result
        return result.x_adv

    built = BuiltAttack(f"xaiadv:{name}", params, run)
    return built


def _build_detector_aware(
    model: nn.Module, bounds: tuple[float, float], preprocessing: Any, params: dict[str, Any]
) -> BuiltAttack:
    """Detector-aware PGD against ``params["detector"]``, a fitted detector of ``model`` with a
    differentiable score; the other params are :class:`~xaiadv.plugins.adaptive.AdaptiveConfig`'s."""
    from xaiadv.plugins.adaptive import (
        AdaptiveConfig,
        check_same_model,
        detector_aware_pgd,
        differentiable_detector,
    )

    params = dict(params)
    if params.get("detector") is None:
        raise ParameterError(
            "detector",
            f"xaiadv:{DETECTOR_AWARE} needs a fitted detector with a differentiable score (detector=...); "
            "a run config cannot give one: the detector study's `adaptive` parameters run it against each "
            "detector of the run",
        )
    scorer = differentiable_detector(params.pop("detector"))
    check_same_model(scorer, model)
    config = AdaptiveConfig(**{key: float(v) if key == "norm" else v for key, v in params.items()})
    classifier = Classifier(model, bounds, preprocessing)

    def run(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            with torch.no_grad(), classifier.evaluating():
                y = classifier.logits(x).argmax(1)
        return detector_aware_pgd(classifier, scorer, x, y, config=config).x_adv

    return BuiltAttack(f"xaiadv:{DETECTOR_AWARE}", params, run)


def _mean_std(preprocessing: Any, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean, std = (
        np.broadcast_to(np.asarray(value, dtype=np.float32).reshape(-1), (n_channels,)).copy()
        for value in preprocessing
    )
    return mean, std


def _build_art(
    name: str, model: nn.Module, bounds: tuple[float, float], preprocessing: Any, params: dict[str, Any]
) -> BuiltAttack:
    cls = _art_attacks()[name]
    classifiers: dict[tuple[int, ...], Any] = {}

    def classifier_for(x: torch.Tensor) -> Any:
        shape = tuple(x.shape[1:])
        if shape not in classifiers:
            classifiers[shape] = art_classifier(model, shape, bounds, preprocessing, _device_type(x))
        return classifiers[shape]

    def run(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        with modes_restored(model):
            model.eval()
            attack = cls(classifier_for(x), **params)
            labels = None if y is None else _art_labels(y, model, x, attack)
            x_adv = attack.generate(x.detach().float().cpu().numpy(), y=labels)  # ART models want float32
        return torch.as_tensor(x_adv, device=x.device, dtype=x.dtype)

    return BuiltAttack(f"art:{name}", params, run)


def art_classifier(
    model: nn.Module,
    input_shape: tuple[int, ...],
    bounds: tuple[float, float],
    preprocessing: Any,
    device_type: str = "cpu",
) -> Any:
    """ART's PyTorchClassifier of ``model`` for inputs shaped ``input_shape`` (class count from one probe)."""
    from art.estimators.classification import PyTorchClassifier

    with modes_restored(model), torch.no_grad():
        model.eval()  # the class-count probe must not update BatchNorm statistics
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        n_classes = model(torch.zeros((1, *input_shape), device=device)).shape[1]
    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=n_classes,
        clip_values=bounds,
        preprocessing=None if preprocessing is None else _mean_std(preprocessing, input_shape[0]),
        device_type=device_type,
    )


def _art_labels(y: torch.Tensor, model: nn.Module, x: torch.Tensor, attack: Any) -> np.ndarray:
    """ART wants one-hot labels for most attacks; class indices are converted with the model's class count."""
    labels = y.detach().cpu().numpy()
    if labels.ndim == 1:
        n_classes = attack.estimator.nb_classes
        labels = np.eye(n_classes, dtype=np.float32)[labels]
    return labels


def _device_type(x: torch.Tensor) -> str:
    return "gpu" if x.device.type == "cuda" else "cpu"


def _build_foolbox(
    name: str, model: nn.Module, bounds: tuple[float, float], preprocessing: Any, params: dict[str, Any]
) -> BuiltAttack:
    import foolbox as fb

    epsilons = params.pop("epsilons", None)
    attack = _foolbox_attacks()[name](**params)
    if isinstance(attack, fb.attacks.base.FixedEpsilonAttack) and epsilons is None:
        raise ValueError(f"foolbox:{name} is a fixed-epsilon attack: pass epsilons=<budget>")

    def run(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        with modes_restored(model):
            fb_preprocessing = None
            if preprocessing is not None:
                mean, std = _mean_std(preprocessing, x.shape[1])
                fb_preprocessing = {"mean": mean.tolist(), "std": std.tolist(), "axis": -3}
            fmodel = fb.PyTorchModel(
                model.eval(), bounds=bounds, preprocessing=fb_preprocessing, device=x.device
            )
            labels = fmodel(x).argmax(1) if y is None else y.to(x.device).long()
            _, clipped, _ = attack(
                fmodel, x.detach().float(), fb.criteria.Misclassification(labels), epsilons=epsilons
            )
        return clipped.to(x.dtype)

    return BuiltAttack(f"foolbox:{name}", {**params, "epsilons": epsilons}, run)


class _Normalized(nn.Module):
    """``model((x - mean) / std)``: torchattacks' normalization expects normalized inputs; ours are raw."""

    def __init__(self, model: nn.Module, preprocessing: Any) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "mean", torch.as_tensor(np.asarray(preprocessing[0], dtype=np.float32)).view(1, -1, 1, 1)
        )
        self.register_buffer(
            "std", torch.as_tensor(np.asarray(preprocessing[1], dtype=np.float32)).view(1, -1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.device)) / self.std.to(x.device))


def _build_torchattacks(
    name: str, model: nn.Module, bounds: tuple[float, float], preprocessing: Any, params: dict[str, Any]
) -> BuiltAttack:
    if bounds != (0.0, 1.0):
        raise ValueError(f"torchattacks attacks work on inputs in [0, 1]; got bounds {bounds}")
    cls = _torchattacks_attacks()[name]
    attacked = model if preprocessing is None else _Normalized(model, preprocessing)
    with modes_restored(model):
        attack = cls(attacked, **params)

    def run(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        with modes_restored(model):
            model.eval()  # the prediction for y=None must not update BatchNorm statistics
            labels = y
            if labels is None:
                with torch.no_grad():
                    labels = attack.get_logits(x).argmax(1)
            return attack(x.detach().float(), labels.to(x.device).long()).to(x.dtype)

    return BuiltAttack(f"torchattacks:{name}", params, run)


class ParameterError(ValueError):
    """A parameter an attack or detector cannot take; ``parameter`` names it (None: the combination)."""

    def __init__(self, parameter: str | None, message: str) -> None:
        super().__init__(message if parameter is None else f"{parameter}: {message}")
        self.parameter = parameter
        self.reason = message


def attack_parameters(name: str) -> dict[str, Any]:
    """The parameters ``build_attack(name, ...)`` takes, each with its default (``inspect.empty`` if none).

    Ours: the plugin's table. ART and torchattacks: the constructor's keywords after the estimator or
    model. Foolbox: the constructor's keywords and ``epsilons`` (given at call time).
    """
    source, _, attack_name = name.partition(":")
    if source == "xaiadv" and attack_name == DETECTOR_AWARE:
        from xaiadv.plugins.adaptive import AdaptiveConfig

        fields = dataclasses.fields(AdaptiveConfig)
        return {"detector": inspect.Parameter.empty, **{f.name: f.default for f in fields}}
    if source == "xaiadv":
        return attack_params(XAIADV_ATTACKS[attack_name])
    signature = inspect.signature(_library_attacks(source)[attack_name].__init__)
    keywords = list(signature.parameters.values())[1:]  # self
    if source in ("art", "torchattacks"):
        keywords = keywords[1:]  # the estimator or the model, which the registry passes
    found = {p.name: p.default for p in keywords if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if source == "foolbox":
        found.update(dict.fromkeys(FOOLBOX_CALL_PARAMS, None))
    return found


def check_parameter_names(name: str, params: Mapping[str, Any], valid: Mapping[str, Any]) -> None:
    """An unknown parameter is a :class:`ParameterError` with the nearest valid name, or all of them."""
    for key in params:
        if key not in valid:
            near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else f"valid: {', '.join(valid)}"
            raise ParameterError(key, f"unknown parameter of {name}; {hint}")


def _check_types_like_defaults(name: str, params: Mapping[str, Any], valid: Mapping[str, Any]) -> None:
    """For libraries that check nothing themselves (torchattacks, Foolbox): a value of the default's kind.

    A bool default takes a bool, a number default a number (not a bool; an integer default does not mean
    integers only: torchattacks' CW has ``c=1``); without a default, or with None, it is left to the library.
    """
    for key, value in params.items():
        default = valid[key]
        if default is None or default is inspect.Parameter.empty:
            continue
        said = f"({name}'s default is {default!r}), got {value!r}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ParameterError(key, f"expected true or false {said}")
        elif isinstance(default, numbers.Real) and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)
        ):
            raise ParameterError(key, f"expected a number {said}")


def check_attack(
    name: str,
    params: Mapping[str, Any],
    *,
    model: nn.Module,
    input_shape: tuple[int, ...],
    bounds: tuple[float, float] = (0.0, 1.0),
    preprocessing: tuple[Any, Any] | None = None,
) -> None:
    """Build attack ``name`` with ``params`` for ``model`` as a run would, without running it.

    Raises :class:`ParameterError` naming the parameter at fault: an unknown name (with the nearest valid
    one), a value of the wrong kind, or a value the library itself refuses, blamed on the one parameter
    that fails alone, or on the combination when none does.
    """
    valid = attack_parameters(name)
    check_parameter_names(name, params, valid)
    if name.partition(":")[0] in ("torchattacks", "foolbox"):
        _check_types_like_defaults(name, params, valid)
    blame_refusal(
        name, params, lambda chosen: _construct(name, chosen, model, input_shape, bounds, preprocessing)
    )


def blame_refusal(name: str, params: Mapping[str, Any], construct: Callable[[dict[str, Any]], Any]) -> None:
    """Run ``construct(params)``; on failure, name the parameter that fails alone (else the combination)."""
    try:
        construct(dict(params))
        return
    except Exception as error:  # any refusal of the library is reported with its type
        refusal = error
    culprit = None
    if _succeeds(construct, {}):
        culprit = next((key for key in params if not _succeeds(construct, {key: params[key]})), None)
    said = f"({type(refusal).__name__}: {refusal})"
    if culprit is None:
        raise ParameterError(None, f"{name} refused them {said}") from refusal
    raise ParameterError(culprit, f"{name} refused it {said}") from refusal


def _succeeds(construct: Callable[[dict[str, Any]], Any], params: dict[str, Any]) -> bool:
    try:
        construct(params)
    except Exception:  # only whether it builds matters here
        return False
    return True


def _construct(
    name: str,
    params: dict[str, Any],
    model: nn.Module,
    input_shape: tuple[int, ...],
    bounds: tuple[float, float],
    preprocessing: Any,
) -> None:
    """Build the attack; ART's lazily built estimator is built here for ``input_shape``."""
    built = build_attack(name, model=model, bounds=bounds, preprocessing=preprocessing, **params)
    source, _, attack_name = built.name.partition(":")
    if source == "art":
        with modes_restored(model):
            _art_attacks()[attack_name](art_classifier(model, input_shape, bounds, preprocessing), **params)
