"""Our LRP attacks as Foolbox 3 attacks, called as Foolbox's: ``attack(fmodel, x, criterion, epsilons=...)``.

Each class is a ``MinimizationAttack``: Foolbox's final ``__call__`` converts types, checks the bounds, clips
the one adversarial per sample to every epsilon in ``distance`` (L1 by default, the thesis's measure) and
judges success. ``run`` only reads the torch module, bounds and preprocessing from the fmodel and hands them
to the plugin loop (thesis Algorithm 2), which normalizes before the model and steps in raw input units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.checks import check_inputs
from xaiadv.plugins.features import model_dtype
from xaiadv.plugins.model import Classifier
from xaiadv.plugins.modes import eval_mode

from ._common import attack_classes, attack_params, build_config, require, run_plugin

require("foolbox", "foolbox")

import eagerpy as ep  # noqa: E402
from foolbox.attacks.base import MinimizationAttack, get_criterion, raise_if_kwargs  # noqa: E402
from foolbox.criteria import Misclassification, TargetedMisclassification  # noqa: E402
from foolbox.distances import Distance, l0, l1, l2, linf  # noqa: E402
from foolbox.models.base import Model, ModelWithPreprocessing  # noqa: E402

T = TypeVar("T")

DISTANCES: dict[str, Distance] = {"l0": l0, "l1": l1, "l2": l2, "linf": linf}
#: Plugin parameters Foolbox decides elsewhere: the criterion chooses targeting, and a trace has no way out.
_NOT_PARAMETERS = ("targeted", "trace")


class LRPAttack(MinimizationAttack):
    """One plugin attack as a Foolbox ``MinimizationAttack``; subclasses name only their ``pattern``.

    Keyword-only parameters: the plugin's (``eps``, ``n_batch``, ``max_iter``, ``early_stop``, ``composite``,
    ...; see ``xaiadv.bridge._common.attack_params``), validated here by the plugin's config; ``distance``
    ("l1" default, "l2", "linf", "l0" or a foolbox Distance) in which Foolbox clips to each epsilon;
    ``model``, the torch module, needed only when it cannot be read from the fmodel.
    """

    pattern: ClassVar[str]

    def __init__(
        self, *, model: nn.Module | None = None, distance: str | Distance = "l1", **params: Any
    ) -> None:
        refused = sorted(set(params) & set(_NOT_PARAMETERS))
        if refused:
            raise TypeError(
                f"{refused}: in Foolbox the criterion chooses targeting, and no trace is returned"
            )
        if model is not None:
            checks.module("model", model)
        self.config = build_config(self.pattern, params)
        self._distance = _as_distance(distance)
        self.model = model

    @property
    def distance(self) -> Distance:
        return self._distance

    def __call__(  # type: ignore[misc]  # Foolbox marks it @final; wrapped for the two reasons below
        self, model: Model, inputs: T, criterion: Any, *, epsilons: Any, **kwargs: Any
    ) -> Any:
        """Foolbox's call, wrapped only where ``run`` cannot help. Its bound check, a bare assert before
        ``run``, becomes an error naming NaN, Inf or out-of-bounds inputs, and an empty batch (on which that
        check fails) returns empty results; its success check, a model call after ``run``, runs in eval
        mode like the attack (a train-mode BatchNorm keeps its statistics)."""
        x, restore_type = ep.astensor_(inputs)
        if not isinstance(x.raw, torch.Tensor):  # run() refuses it, naming the type
            return super().__call__(model, inputs, criterion, epsilons=epsilons, **kwargs)
        check_inputs(x.raw, (float(model.bounds[0]), float(model.bounds[1])), name="inputs")
        if len(x.raw) == 0:
            return _empty_outputs(x.raw, epsilons, restore_type)
        with eval_mode(self._module(model)):
            return super().__call__(model, inputs, criterion, epsilons=epsilons, **kwargs)

    def run(
        self,
        model: Model,
        inputs: T,
        criterion: Misclassification | TargetedMisclassification | T,
        *,
        early_stop: float | None = None,
        **kwargs: Any,
    ) -> T:
        """The adversarial of each input (Foolbox's hook, where the work is done); Foolbox's ``early_stop``
        (a distance) is not needed, as every sample already stops at its first success when the
        ``early_stop`` parameter is True. Inputs whose dtype differs from the module's are refused before
        the attack runs (Foolbox's success check would fail after it)."""
        raise_if_kwargs(kwargs)
        del early_stop
        x, restore_type = ep.astensor_(inputs)
        targeted, classes = _classes(get_criterion(criterion), len(x))
        if not isinstance(x.raw, torch.Tensor):
            raise TypeError(f"inputs must be PyTorch tensors (a fb.PyTorchModel); got {type(x.raw).__name__}")
        module = self._module(model)
        _check_dtype(module, x.raw)
        classifier = Classifier(
            module, (float(model.bounds[0]), float(model.bounds[1])), preprocessing_of(model, x.ndim)
        )
        result = run_plugin(
            self.pattern, classifier, x.raw, classes.raw, config=replace(self.config, targeted=targeted)
        )
        return restore_type(ep.astensor(result.x_adv))

    def _module(self, fmodel: Model) -> nn.Module:
        return self.model if self.model is not None else module_of(fmodel)

    def __repr__(self) -> str:
        names = [name for name in attack_params(self.pattern) if name not in _NOT_PARAMETERS]
        settings = [f"{name}={getattr(self.config, name)!r}" for name in names]
        distance = next((name for name, value in DISTANCES.items() if value is self.distance), self.distance)
        settings.append(f"distance={distance!r}")
        if self.model is not None:
            settings.append(f"model={type(self.model).__name__}")
        return f"{type(self).__name__}({', '.join(settings)})"


def _check_dtype(module: nn.Module, inputs: torch.Tensor) -> None:
    dtype = model_dtype(module, default=inputs.dtype)  # a module without parameters takes any
    if inputs.dtype != dtype:
        raise ValueError(
            f"inputs have dtype {inputs.dtype} but the model's parameters {dtype}: Foolbox calls the "
            f"model on the inputs as given; pass inputs.to({dtype})"
        )


def _empty_outputs(
    inputs: torch.Tensor, epsilons: Any, restore_type: Callable[[Any], Any]
) -> tuple[Any, ...]:
    """What Foolbox's call returns for no samples, (raw, clipped, success), in the caller's tensor type:
    one raw and one clipped per epsilon and success shaped (K, 0) when epsilons is a list."""

    def copy() -> Any:
        return restore_type(ep.astensor(inputs.clone()))

    if not isinstance(epsilons, Iterable):
        success = torch.zeros(0, dtype=torch.bool, device=inputs.device)
        return copy(), copy(), restore_type(ep.astensor(success))
    count = len(list(epsilons))
    success = torch.zeros(count, 0, dtype=torch.bool, device=inputs.device)
    return [copy()] * count, [copy() for _ in range(count)], restore_type(ep.astensor(success))


def _as_distance(distance: str | Distance) -> Distance:
    if isinstance(distance, Distance):
        return distance
    if distance not in DISTANCES:
        raise ValueError(
            f"distance must be one of {sorted(DISTANCES)} or a foolbox Distance; got {distance!r}"
        )
    return DISTANCES[distance]


def _classes(criterion: Any, n_samples: int) -> tuple[bool, ep.Tensor]:
    """(targeted, classes) from a Misclassification or TargetedMisclassification criterion."""
    if isinstance(criterion, Misclassification):
        targeted, classes, name = False, criterion.labels, "labels"
    elif isinstance(criterion, TargetedMisclassification):
        targeted, classes, name = True, criterion.target_classes, "target_classes"
    else:
        raise ValueError(
            f"criterion must be Misclassification or TargetedMisclassification; got {criterion!r}"
        )
    if classes.shape != (n_samples,):
        raise ValueError(f"criterion {name} must have shape ({n_samples},); got {classes.shape}")
    return targeted, classes


def module_of(fmodel: Model) -> nn.Module:
    """The torch module inside a ``fb.PyTorchModel``, kept only in the closure of its call function.

    Foolbox 3 keeps no public reference to it; ``model=`` on the attack is the public way, this the
    convenience when it is left out (the fmodel's preprocessing is read from ``_preprocess_args`` alike).
    """
    call = getattr(fmodel, "_model", None) if isinstance(fmodel, ModelWithPreprocessing) else None
    for cell in getattr(call, "__closure__", None) or ():
        if isinstance(cell.cell_contents, nn.Module):
            return cell.cell_contents
    raise TypeError(
        f"cannot find the torch module inside the {type(fmodel).__name__} model; "
        "pass model=<the torch.nn.Module> to the attack"
    )


def preprocessing_of(fmodel: Model, ndim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fmodel's (mean, std) as one value or one per channel (axis 1), for the plugin.

    A model that is not a ``ModelWithPreprocessing`` has none to read: ``model=`` then takes raw inputs.
    """
    if not isinstance(fmodel, ModelWithPreprocessing):
        return None
    mean, std, flip_axis = fmodel._preprocess_args
    if flip_axis is not None:
        raise ValueError(
            "fmodel preprocessing flip_axis is not supported by the LRP attacks; flip in the model"
        )
    if mean is None and std is None:
        return None
    return _channel_values(mean, 0.0, ndim, "mean"), _channel_values(std, 1.0, ndim, "std")


def _channel_values(value: ep.Tensor | None, default: float, ndim: int, name: str) -> torch.Tensor:
    """Flatten a preprocessing tensor that is a scalar or varies along the channel axis 1 only."""
    if value is None:
        return torch.tensor(default)
    tensor = torch.as_tensor(value.raw)
    shape = (1,) * (ndim - tensor.dim()) + tuple(tensor.shape)
    on_channels = len(shape) == ndim and all(size == 1 for axis, size in enumerate(shape) if axis != 1)
    if tensor.numel() > 1 and not on_channels:
        raise ValueError(
            f"fmodel preprocessing {name} must be a scalar or per channel on the channel axis "
            f"(axis=-3 for images); got shape {tuple(tensor.shape)} for inputs with {ndim} dimensions"
        )
    return tensor.flatten()


LRPFlip, LRPMean, LRPGrad, LRPGradMean = attack_classes(
    LRPAttack, "a Foolbox MinimizationAttack", hidden=_NOT_PARAMETERS, own=("distance", "model")
)
