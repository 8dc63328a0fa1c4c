"""Canonizers for LRP chosen by data flow, proven by one forward, and undone even when they fail half-way.

Zennit's ``SequentialMergeBatchNorm`` pairs each BatchNorm with the linear layer *declared* just before it:
a model that declares its layers in another order than it calls them gets the wrong layer merged, and the
attack then runs on a different function than the caller's, silently. Here a BatchNorm is merged into the
linear layer whose output it consumes in one forward's autograd graph (:func:`plan_batchnorm_merges`).
Whatever the canonizers (ours, Zennit's, the caller's), :func:`check_canonized` proves the canonized model
computes the original logits, and :func:`model_restored` puts back every parameter, buffer, submodule,
attribute and hook a canonizer touched, even when it raised half-way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torch.autograd.graph import Node
from zennit.canonizers import Canonizer, NamedMergeBatchNorm
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import BatchNorm
from zennit.types import Linear as LinearLayer

from .checks import as_output
from .graph import graph_nodes

#: How many samples of the first batch the merge probe and the canonizer check run on.
PROBE_SAMPLES = 32


@contextmanager
def forward_errors_named(x: torch.Tensor) -> Iterator[None]:
    """A RuntimeError of the model's forward becomes a ValueError naming x's shape, dtype and device."""
    try:
        yield
    except RuntimeError as error:
        raise ValueError(
            f"the model's forward failed on x (shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}): "
            f"{error}"
        ) from error


@dataclass(frozen=True)
class MergePlan:
    """BatchNorm merges read off one forward: ``pairs`` (linear layer, BatchNorm) by name, and for every
    BatchNorm that no merge can fold away, one sentence saying why (``unmergeable``)."""

    pairs: tuple[tuple[str, str], ...]
    unmergeable: tuple[str, ...]


def plan_batchnorm_merges(model: nn.Module, z: torch.Tensor) -> MergePlan:
    """Pair each BatchNorm with the linear layer whose output it consumes, from one forward of ``z``.

    A pair needs the BatchNorm's input to be the very output of a linear layer (Linear, Conv, ConvTranspose),
    each called once, that output consumed by nothing else (the merge changes it for every consumer), and
    running statistics with affine parameters. A BatchNorm the forward never calls is left alone.
    """
    names = {module: name for name, module in model.named_modules()}
    produced: dict[Node, str] = {}
    batchnorm_inputs: dict[str, Node | None] = {}
    calls: Counter[str] = Counter()

    def after(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
        calls[names[module]] += 1
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced.setdefault(output.grad_fn, names[module])  # inner modules finish first

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        batchnorm_inputs[names[module]] = None if source is None else source.grad_fn

    handles = [module.register_forward_hook(after) for module in names]
    handles += [module.register_forward_pre_hook(before) for module in names if isinstance(module, BatchNorm)]
    try:
        with torch.enable_grad():
            logits = as_output(model(z.detach().requires_grad_(True)))
    finally:
        for handle in handles:
            handle.remove()
    consumers = _consumer_counts(logits.grad_fn)
    pairs, unmergeable = [], []
    for batch_norm, source in batchnorm_inputs.items():
        producer = produced.get(source) if source is not None else None
        reason = _unmergeable_reason(model, batch_norm, source, producer, calls, consumers)
        if reason is None:
            pairs.append((producer, batch_norm))
        else:
            unmergeable.append(f"{batch_norm}: {reason}")
    return MergePlan(tuple(pairs), tuple(unmergeable))


def _consumer_counts(root: Node | None) -> Counter[Node]:
    """How many graph nodes take each node's output as an input."""
    counts: Counter[Node] = Counter()
    for node in graph_nodes(root) if root is not None else []:
        counts.update(child for child, _ in node.next_functions if child is not None)
    return counts


def _unmergeable_reason(
    model: nn.Module,
    batch_norm: str,
    source: Node | None,
    producer: str | None,
    calls: Counter[str],
    consumers: Counter[Node],
) -> str | None:
    """Why ``batch_norm`` cannot be merged into ``producer`` (None when it can)."""
    module = model.get_submodule(batch_norm)
    if calls[batch_norm] > 1:
        return f"it is called {calls[batch_norm]} times in one forward"
    if module.running_mean is None or module.running_var is None:
        return "it has no running statistics (track_running_stats=False): it normalizes each batch by itself"
    if module.weight is None or module.bias is None:
        return "it has no affine weight and bias (affine=False), which the merge rewrites"
    if source is None:
        return "its input does not depend on the model input"
    if producer is None or not isinstance(model.get_submodule(producer), LinearLayer):
        origin = f"layer {producer}" if producer is not None else f"the operation {source.name()}"
        return f"its input comes from {origin}, not straight from a linear layer"
    if calls[producer] > 1:
        return f"the layer feeding it, {producer}, is called {calls[producer]} times in one forward"
    if consumers[source] > 1:
        return f"the output of the layer feeding it, {producer}, is also used elsewhere"
    return None


class ExactMergeBatchNorm(NamedMergeBatchNorm):
    """Zennit's merge of the named (linear layer, BatchNorm) pairs, with the merged BatchNorm exactly the
    identity: Zennit leaves it as x / sqrt(1 + eps), a factor 1 - 5e-6 per layer at eps = 1e-5, which
    changes the logits far beyond float64 rounding. Here eps is 0 while merged and restored on removal."""

    def register(self, linears: Sequence[nn.Module], batch_norm: nn.Module) -> None:
        self.batch_norm_eps = batch_norm.eps
        super().register(linears, batch_norm)
        batch_norm.eps = 0.0

    def remove(self) -> None:
        super().remove()
        self.batch_norm.eps = self.batch_norm_eps


def _has_torchvision_residual(model: nn.Module) -> bool:
    blocks = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    return any(isinstance(module, blocks) for module in model.modules())


def default_canonizers(model: nn.Module, z: torch.Tensor, *, refuse_unmergeable: bool) -> list[Canonizer]:
    """Canonizers a model needs for LRP to conserve relevance, read off one forward of ``z``.

    BatchNorms are merged by data flow (:func:`plan_batchnorm_merges`); torchvision residual blocks
    (BasicBlock, Bottleneck, in a ResNet or elsewhere) get Zennit's canonizers, which turn their sums into
    modules a rule handles. With ``refuse_unmergeable`` (the LRP composites) a BatchNorm no merge can fold
    away is a ValueError naming it and why; a gradient method passes through it exactly.
    """
    canonizers: list[Canonizer] = []
    if any(isinstance(module, BatchNorm) for module in model.modules()):
        plan = plan_batchnorm_merges(model, z)
        if plan.unmergeable and refuse_unmergeable:
            raise ValueError(_unmergeable_message(plan.unmergeable))
        if plan.pairs:
            name_map = [((linear,), batch_norm) for linear, batch_norm in plan.pairs]
            canonizers.append(ExactMergeBatchNorm(name_map))
    if _has_torchvision_residual(model):
        canonizers += [ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]
    return canonizers


def _unmergeable_message(reasons: Sequence[str]) -> str:
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    return (
        f"{len(reasons)} BatchNorm layer(s) cannot be merged into the linear layer feeding them ({shown}). "
        "LRP would not conserve relevance through them. Pass canonizers=[...] that handle them, or use "
        "n_batch=1.0 (every value: no relevance is needed, LRP-grad is then IFGSM)."
    )


def logits_tolerance(reference: torch.Tensor) -> float:
    """Largest accepted |canonized - original| logit difference: sqrt(machine eps) of the dtype, times the
    logits' scale (a merged BatchNorm rounds differently, a wrong merge differs by the size of the logits)."""
    scale = 1.0 + float(reference.abs().max()) if reference.numel() else 1.0
    return float(torch.finfo(reference.dtype).eps) ** 0.5 * scale


def check_canonized(
    model: nn.Module, z: torch.Tensor, reference: torch.Tensor, canonizers: Sequence[Canonizer]
) -> None:
    """Refuse ``canonizers`` under which ``model`` computes other logits for ``z`` than ``reference`` (the
    original model's), naming the first canonizer that changes them. One forward when they keep the
    function; the model is as on entry afterwards either way."""
    difference = _canonized_difference(model, z, reference, canonizers)
    tolerance = logits_tolerance(reference)
    if difference <= tolerance:
        return
    culprit = next(
        (
            type(canonizers[count - 1]).__name__
            for count in range(1, len(canonizers) + 1)
            if _canonized_difference(model, z, reference, canonizers[:count]) > tolerance
        ),
        "none alone (is the model deterministic in eval mode?)",
    )
    raise ValueError(
        f"canonizing the model changes its logits by up to {difference:.3g} (tolerance {tolerance:.3g}), so "
        f"relevance would be computed for another function than your model's; the canonizer that changes "
        f"them: {culprit}. Pass canonizers=[...] that keep the function."
    )


def _canonized_difference(
    model: nn.Module, z: torch.Tensor, reference: torch.Tensor, canonizers: Sequence[Canonizer]
) -> float:
    """max |logits - reference| of ``model`` under ``canonizers``, applied for one forward and undone."""
    with model_restored(model):
        instances: list[Canonizer] = []
        try:
            for canonizer in canonizers:
                instances += _applied(canonizer, model)
            with torch.no_grad():
                logits = as_output(model(z))
        finally:
            for instance in reversed(instances):
                instance.remove()
    return float((logits.double() - reference.double()).abs().max()) if logits.numel() else 0.0


def _applied(canonizer: Canonizer, model: nn.Module) -> list[Canonizer]:
    """``canonizer.apply(model)``; its failure (a merge of mismatched layers) named as the canonizer's."""
    try:
        return canonizer.apply(model)
    except RuntimeError as error:
        raise ValueError(
            f"the canonizer {type(canonizer).__name__} failed on this model ({error}); the model is left "
            "as it was. Pass canonizers=[...] that fit its layers, or None to merge BatchNorms by data flow"
        ) from error


@dataclass
class _ModuleState:
    """References to what a canonizer may replace on one module (no tensor is copied)."""

    parameters: dict[str, nn.Parameter | None]
    parameter_data: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor | None]
    buffer_data: dict[str, torch.Tensor]
    modules: dict[str, nn.Module | None]
    attributes: frozenset[str]
    hooks: dict[str, frozenset[Any]]
    numbers: dict[str, float | int | bool | str | None]


def _snapshot(module: nn.Module) -> _ModuleState:
    hooks = {
        key: frozenset(value)
        for key, value in vars(module).items()
        if isinstance(value, dict) and key.startswith(("_forward", "_backward"))
    }
    return _ModuleState(
        parameters=dict(module._parameters),
        parameter_data={k: p.data for k, p in module._parameters.items() if p is not None},
        buffers=dict(module._buffers),
        buffer_data={k: b.data for k, b in module._buffers.items() if b is not None},
        modules=dict(module._modules),
        attributes=frozenset(vars(module)),
        hooks=hooks,
        numbers={key: value for key, value in vars(module).items() if isinstance(value, (float, int, str))},
    )


def _restore(module: nn.Module, state: _ModuleState) -> None:
    """Put back replaced parameters, buffers and submodules, their data, and number attributes (a
    BatchNorm's eps); drop added attributes and hooks."""
    for table, saved in ((module._parameters, state.parameters), (module._buffers, state.buffers)):
        if table != saved:
            table.clear()
            table.update(saved)
    saved_data = (module._parameters, state.parameter_data), (module._buffers, state.buffer_data)
    for tensors, originals in saved_data:
        for key, data in originals.items():
            tensor = tensors[key]
            same = tensor.data_ptr() == data.data_ptr() and tensor.shape == data.shape
            if not same or tensor.dtype != data.dtype:
                tensor.data = data
    if module._modules != state.modules:
        module._modules.clear()
        module._modules.update(state.modules)
    for key in set(vars(module)) - state.attributes:
        delattr(module, key)
    for key, value in state.numbers.items():
        if getattr(module, key, None) != value:
            setattr(module, key, value)
    for key, saved_keys in state.hooks.items():
        table = getattr(module, key)
        for hook_id in set(table) - saved_keys:
            del table[hook_id]


@contextmanager
def model_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Every module's parameters, buffers, submodules, instance attributes, number attributes and hooks as
    on entry, on exit, even after an exception.

    Canonizers rewrite a model by replacing tensors' ``.data`` and attributes (Zennit's merge swaps in new
    weights, adds a bias, overrides ``forward``); the snapshot keeps references to the originals, so the
    restore is exact, bit for bit, and costs no copy. A canonizer writing into a tensor in place is not
    undone here; :func:`check_canonized` still refuses the function it changed.
    """
    states = [(module, _snapshot(module)) for module in model.modules()]
    try:
        yield model
    finally:
        for module, state in states:
            _restore(module, state)
