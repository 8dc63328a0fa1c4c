"""Batched LRP relevance from Zennit composites, and the model session the attacks share.

Relevance is computed in the model's own input space: when the caller's inputs are normalized by
``(x - mean) / std`` before the model, the normalized tensor is the leaf the hooks attribute to, and
the relevance of an input value is that of its normalized twin (element-wise, never scaled by 1/std,
which would distort the ranking across channels). Loss gradients are taken through the same forward
with the hooks switched off (``composite.inactive()``): gradients taken while they are active are
relevance, not gradients.

The first forward of each attached context also inspects the autograd graph for what the hooks cannot see:
branch merges outside any module (a hand-written residual) and activations called as functions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torch.autograd.graph import Node
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES
from zennit.core import Composite
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Activation, BatchNorm, Convolution

from .features import model_dtype
from .modes import eval_mode
from .rules import FAST_COMPOSITES

logger = logging.getLogger(__name__)

#: Composites accepted by name. ``epsilon_alpha2_beta1_flat`` is the thesis's a=2, b=-1 (section 3.1.4).
COMPOSITE_NAMES: tuple[str, ...] = (
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1_flat",
    "epsilon_plus",
    "epsilon_alpha2_beta1",
    "epsilon_gamma_box",
    "guided_backprop",
)
DEFAULT_COMPOSITE = "epsilon_plus_flat"

Preprocessing = tuple[torch.Tensor, torch.Tensor] | None

#: Autograd nodes of elementwise ops on two tensors. When both inputs depend on the model input (a residual
#: h + f(h), a gate h * g(h)) the relevance pass hands each branch the full relevance: not conserved.
_MERGE_NODES = frozenset({"AddBackward0", "SubBackward0", "MulBackward0"})
#: Autograd nodes of elementwise activations, to find those called as functions rather than modules.
_ACTIVATION_NODES = frozenset(
    {
        "ReluBackward0",
        "ThresholdBackward0",
        "LeakyReluBackward0",
        "PreluKernelBackward0",
        "RreluWithNoiseBackward0",
        "EluBackward0",
        "CeluBackward0",
        "GeluBackward0",
        "SiluBackward0",
        "MishBackward0",
        "SoftplusBackward0",
        "SigmoidBackward0",
        "LogSigmoidBackward0",
        "TanhBackward0",
        "HardtanhBackward0",
        "HardsigmoidBackward0",
        "HardswishBackward0",
    }
)


def check_composite(composite: str | Composite) -> None:
    """Raise a ValueError naming the valid composites unless ``composite`` is one of them or a Composite."""
    if isinstance(composite, Composite):
        return
    if not isinstance(composite, str) or composite not in COMPOSITE_NAMES:
        raise ValueError(
            f"composite must be a zennit Composite or one of {', '.join(COMPOSITE_NAMES)}; got {composite!r}"
        )


def as_preprocessing(preprocessing: object, like: torch.Tensor) -> Preprocessing:
    """Normalize ``(mean, std)`` (scalars, sequences per channel, arrays or tensors) to broadcastable tensors.

    Per-channel values broadcast over the channel axis 1 (shape (1,C,1,1)); arrays already shaped
    (1, ...) and broadcastable against a sample pass as they are. std must be positive.
    """
    if preprocessing is None:
        return None
    if not isinstance(preprocessing, (tuple, list)) or len(preprocessing) != 2:
        raise ValueError(f"preprocessing must be None or a pair (mean, std); got {preprocessing!r}")
    pairs = zip(preprocessing, ("mean", "std"), strict=True)
    mean, std = (_channel_tensor(value, like, name) for value, name in pairs)
    if not bool(torch.all(std > 0)):
        raise ValueError("preprocessing std must be positive everywhere")
    return mean, std


def _channel_tensor(value: object, like: torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64).to(like.device)
    if tensor.dim() == like.dim() and tensor.shape[0] == 1 and _broadcasts(tensor.shape, like.shape):
        shape = list(tensor.shape)
    elif (tensor := tensor.flatten()).numel() == 1:
        shape = [1] * like.dim()
    elif like.dim() >= 2 and tensor.numel() == like.shape[1]:
        shape = [1, tensor.numel()] + [1] * (like.dim() - 2)
    else:
        raise ValueError(
            f"preprocessing {name} must be a scalar or one value per channel ({like.shape[1]}); "
            f"got {tensor.numel()} values"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"preprocessing {name} must be finite")
    return tensor.reshape(shape)


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    return all(size in (1, full) for size, full in zip(shape[1:], target[1:], strict=True))


def _has_torchvision_residual(model: nn.Module) -> bool:
    blocks = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    return any(isinstance(module, blocks) for module in model.modules())


def default_canonizers(model: nn.Module) -> list[Canonizer]:
    """Canonizers a model needs for LRP to conserve relevance.

    torchvision ResNets get Zennit's ResNetCanonizer (residual sums and BatchNorm), VGGs the VGGCanonizer,
    any other model with BatchNorm the sequential BatchNorm merge. Residual blocks outside a torchvision
    ResNet are refused: without a canonizer their sums do not conserve relevance.
    """
    if isinstance(model, torchvision.models.ResNet):
        return [ResNetCanonizer()]
    if _has_torchvision_residual(model):
        raise ValueError(
            "model contains torchvision residual blocks outside a torchvision ResNet; LRP would not conserve "
            "relevance through their sums. Pass canonizers=[...] that handle them."
        )
    if isinstance(model, torchvision.models.VGG):
        return [VGGCanonizer()]
    if any(isinstance(module, BatchNorm) for module in model.modules()):
        return [SequentialMergeBatchNorm()]
    return []


def _unmerged_batchnorms(model: nn.Module) -> list[str]:
    """Names of BatchNorm layers a merge canonizer left in place (a merged one is the identity)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, BatchNorm) and not _is_identity(module)
    ]


def _is_identity(batch_norm: nn.Module) -> bool:
    stats = [(batch_norm.running_mean, 0.0), (batch_norm.running_var, 1.0)]
    if batch_norm.weight is not None:
        stats += [(batch_norm.weight, 1.0), (batch_norm.bias, 0.0)]
    return all(tensor is None or bool(torch.all(tensor == value)) for tensor, value in stats)


def build_composite(
    composite: str | Composite,
    canonizers: Sequence[Canonizer],
    box: tuple[torch.Tensor, torch.Tensor],
    *,
    fast_rules: bool = True,
) -> Composite:
    """A fresh Composite for ``composite`` (a name or an instance used as given) with ``canonizers``.

    ``box`` is the (low, high) input range in the model's own space, which ``epsilon_gamma_box`` needs.
    With ``fast_rules`` a named composite gets the closed-form rules of :mod:`.rules` for Conv2d and
    Linear (equal to Zennit's stock rules, proven by tests); False gives the stock composite.
    """
    check_composite(composite)
    if isinstance(composite, Composite):
        return composite
    if fast_rules and composite in FAST_COMPOSITES:
        return FAST_COMPOSITES[composite](list(canonizers), box)
    factory = COMPOSITES[composite]
    if composite == "epsilon_gamma_box":
        return factory(low=box[0], high=box[1], canonizers=list(canonizers))
    return factory(canonizers=list(canonizers))


@contextmanager
def activation_module_nodes(model: nn.Module) -> Iterator[set[Node]]:
    """The autograd nodes that activation modules create in the block's forwards (what the hooks see).

    The recording hooks run before any other forward hook, so they see the module's own output, which
    depends on its inputs only (a rule's replacement might not, and lead the walk out of the module);
    they are removed on exit, even after an exception.
    """
    nodes: set[Node] = set()

    def record(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            inputs = {
                arg.grad_fn for arg in args if isinstance(arg, torch.Tensor) and arg.grad_fn is not None
            }
            nodes.update(_nodes_between(output.grad_fn, inputs))

    modules = [module for module in model.modules() if isinstance(module, Activation)]
    handles = [module.register_forward_hook(record, prepend=True) for module in modules]
    try:
        yield nodes
    finally:
        for handle in handles:
            handle.remove()


def _nodes_between(output: Node, inputs: set[Node]) -> set[Node]:
    """``output`` and the nodes behind it down to, not including, the ``inputs`` nodes: one module's own
    nodes (Tanhshrink's x - tanh(x) has three). An in-place module's output node is its input's: just it."""
    found = {output}
    stack = [] if output in inputs else [child for child, _ in output.next_functions]
    while stack:
        node = stack.pop()
        if node is not None and node not in inputs and node not in found:
            found.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return found


def _graph_nodes(root: Node) -> list[Node]:
    """Every autograd node behind ``root``, each listed after all the nodes it leads to.

    Iterative depth-first search (a deep network would overflow Python's recursion limit). A node is marked
    when it is expanded, not when pushed, so one reached again deeper down is finished there first.
    """
    order: list[Node] = []
    expanded: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif node not in expanded:
            expanded.add(node)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions if child is not None)
    return order


@dataclass(frozen=True)
class GraphFindings:
    """What a forward's autograd graph holds that the relevance hooks cannot handle, as node names.

    ``merges``: elementwise Add/Sub/Mul nodes with two inputs that depend on the model input, outside an
    activation module. ``functional_activations``: activation nodes on the model input's path that no
    activation module produced.
    """

    merges: tuple[str, ...]
    functional_activations: tuple[str, ...]


def inspect_graph(z: torch.Tensor, root: Node, module_nodes: set[Node]) -> GraphFindings:
    """Find branch merges and functional activations between the leaf ``z`` and the output node ``root``.

    A bias addition or a constant factor does not merge branches (its other input is a parameter or no
    tensor), nor does a concatenation, through which LRP conserves relevance. ``module_nodes`` are the
    nodes created inside activation modules (:func:`activation_module_nodes`), which the hooks do see.
    """
    depends: dict[Node, bool] = {}
    merges: list[str] = []
    activations: list[str] = []
    for node in _graph_nodes(root):
        inputs = [depends[child] for child, _ in node.next_functions if child is not None]
        depends[node] = getattr(node, "variable", None) is z or any(inputs)
        if node in module_nodes:
            continue
        if node.name() in _MERGE_NODES and sum(inputs) >= 2:
            merges.append(node.name())
        elif node.name() in _ACTIVATION_NODES and depends[node]:
            activations.append(node.name())
    return GraphFindings(tuple(merges), tuple(activations))


@dataclass(frozen=True)
class Conservation:
    """Relevance sum per sample next to the target logit it should equal (thesis eq. 2.16)."""

    relevance_sum: torch.Tensor
    target_logit: torch.Tensor

    @property
    def relative_error(self) -> torch.Tensor:
        """|sum R - f_t(x)| / max(|f_t(x)|, 1e-12) per sample."""
        denominator = self.target_logit.abs().clamp_min(1e-12)
        return (self.relevance_sum - self.target_logit).abs() / denominator


class Relevance:
    """LRP relevance of any torch classifier from a Zennit composite, one target class per sample.

    ``Relevance(model, composite="epsilon_plus_flat")(x, target)`` returns a tensor shaped like ``x``.
    The model is put in eval mode for the work and restored after; hooks and canonizers are removed
    even after an exception. ``preprocessing=(mean, std)`` is applied before the model and relevance
    is attributed to the normalized input, mapped back element-wise. ``bounds`` are the raw inputs'
    range (the box of ``epsilon_gamma_box``). ``fast_rules=False`` uses Zennit's stock rules.

    The first forward of each attached context inspects its autograd graph (:func:`inspect_graph`). An
    elementwise Add/Sub/Mul merging two input-dependent branches outside a module (a hand-written residual)
    is refused for the LRP composites: relevance would not be conserved through it (guided backprop, a
    gradient method, is exact there). A Composite instance only warns, which :mod:`warnings` filters
    silence: its rules may handle the merge inside a module, which the check does not look into; one
    without hooks computes plain gradients and is not inspected. Activations called as functions are
    refused for guided backprop and warned about for LRP unless they are ReLUs (exact); a Composite
    instance's rules are unknown, so its activations are not checked. Not seen: a merge by a reduction
    (``torch.stack(...).sum(0)`` outside a zennit Sum module) or by a division.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: str | Composite = DEFAULT_COMPOSITE,
        *,
        canonizers: Sequence[Canonizer] | None = None,
        preprocessing: object = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        fast_rules: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        check_composite(composite)
        if canonizers is not None and isinstance(composite, Composite):
            raise ValueError(
                "canonizers= applies to named composites; build your Composite with canonizers=[...]"
            )
        self.model = model
        self.composite = composite
        if isinstance(composite, Composite):
            self.canonizers = list(composite.canonizers)
        else:
            self.canonizers = list(default_canonizers(model) if canonizers is None else canonizers)
        self.preprocessing = preprocessing
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.fast_rules = fast_rules
        self._active: Composite | None = None
        self._graph_unchecked = False
        self._norm: Preprocessing = None
        self._check_activation_modules()

    def _check_activation_modules(self) -> None:
        """Refuse guided backprop, before any work, for a model with weights but no activation modules.

        Guided backprop rewrites the gradients of activation modules, so without any it would silently be
        the plain gradient. Functional activations next to modules are found by the first forward's graph
        inspection (:meth:`_check_functional`).
        """
        if self.composite != "guided_backprop":
            return
        has_weights = any(isinstance(m, (Convolution, nn.Linear)) for m in self.model.modules())
        if has_weights and not any(isinstance(m, Activation) for m in self.model.modules()):
            raise ValueError(
                "model has no activation modules (torch.nn.ReLU, ...): its activations are functional calls "
                "the relevance hooks cannot see; guided backprop would silently equal the plain gradient."
            )

    def _check_graph(self, z: torch.Tensor, logits: object, module_nodes: set[Node]) -> None:
        """Refuse or warn about what the first forward's graph shows the hooks cannot handle (nothing to
        inspect when the logits do not depend on z)."""
        if not isinstance(logits, torch.Tensor) or logits.grad_fn is None:
            return
        findings = inspect_graph(z, logits.grad_fn, module_nodes)
        if findings.merges and self.composite != "guided_backprop":  # a gradient method: merges are exact
            self._check_merges(findings.merges)
        if findings.functional_activations and isinstance(self.composite, str):
            self._check_functional(findings.functional_activations)

    def _check_merges(self, merges: tuple[str, ...]) -> None:
        """Refuse (named composite) or warn (Composite instance) about branch merges outside any module.

        No rule sees such a merge, so relevance flows through it as a gradient: a residual h + f(h) hands
        each branch the full relevance and doubles it (thesis eq. 2.16 fails). A canonizer turns the merge
        into a module a rule handles.
        """
        message = (
            f"model merges two input-dependent branches in {len(merges)} elementwise op(s) "
            f"({', '.join(sorted(set(merges)))}) outside any module, as a hand-written residual h + f(h) "
            "does: LRP would pass relevance into both branches as a gradient and not conserve it. Pass "
            "canonizers=[...] that turn each merge into a module Zennit's rules handle (zennit.layer.Sum "
            "over torch.stack, as zennit.torchvision.ResNetCanonizer does)"
        )
        if isinstance(self.composite, str):
            raise ValueError(message + ".")
        warnings.warn(message + ", unless your Composite's rules handle it.", UserWarning, stacklevel=5)

    def _check_functional(self, activations: tuple[str, ...]) -> None:
        """Refuse guided backprop through any functional activation; warn LRP about non-ReLU ones.

        The hooks see activation modules only. Guided backprop would pass the plain gradient through a
        functional one; LRP passes relevance through activations, which a functional ReLU's gate does
        exactly (a unit it closes got no relevance), any other functional activation does not.
        """
        names = ", ".join(sorted(set(activations)))
        message = f"model calls activations as functions ({names}) that the relevance hooks cannot see"
        if self.composite == "guided_backprop":
            raise ValueError(message + "; guided backprop would pass the plain gradient through them.")
        if set(activations) - {"ReluBackward0"}:
            warnings.warn(
                message + "; relevance is exact through a functional ReLU only. Use activation modules.",
                UserWarning,
                stacklevel=5,
            )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw inputs to the model's input space (identity without preprocessing)."""
        if self._norm is None:
            return x
        mean, std = self._norm
        return (x - mean.to(x.dtype)) / std.to(x.dtype)

    @property
    def param_dtype(self) -> torch.dtype:
        """The model's floating dtype (float32 when it has no parameters)."""
        return model_dtype(self.model)

    @contextmanager
    def attached(self, like: torch.Tensor) -> Iterator[Relevance]:
        """Register canonizers and hooks once, in eval mode; undo both on exit, even after an exception.

        ``like`` is an input batch: it sets the device and the shape of the preprocessing tensors.
        """
        if self._active is not None:
            yield self
            return
        self._norm = as_preprocessing(self.preprocessing, like)
        low, high = (
            torch.full((1,), bound, dtype=torch.float64, device=like.device) for bound in self.bounds
        )
        box = (self.normalize(low).to(self.param_dtype), self.normalize(high).to(self.param_dtype))
        composite = build_composite(self.composite, self.canonizers, box, fast_rules=self.fast_rules)
        with eval_mode(self.model):
            try:
                composite.register(self.model)
                self._active = composite
                unmerged = _unmerged_batchnorms(self.model) if len(composite.hook_refs) else []
                if unmerged:
                    raise ValueError(
                        f"BatchNorm layers {unmerged} are not merged into a preceding linear layer, so "
                        "relevance would not be conserved; pass canonizers=[...] (for a Composite: build it "
                        "with them)"
                    )
                self._graph_unchecked = isinstance(self.composite, str) or bool(composite.hook_refs)
                yield self
            finally:
                self._active = None
                composite.remove()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward through the hooked model: returns (normalized leaf z, logits).

        z requires grad; the gradient and relevance backward passes both start from these logits. The first
        forward with gradients in an attached context has its graph inspected (once: an attack loop does
        not pay it per iteration), which may raise a ValueError or warn (see the class docstring).
        """
        self._require_attached()
        z = self.normalize(x).to(self.param_dtype).detach().requires_grad_(True)
        if not (self._graph_unchecked and torch.is_grad_enabled()):
            return z, self.model(z)
        with activation_module_nodes(self.model) as module_nodes:
            logits = self.model(z)
        self._check_graph(z, logits, module_nodes)
        self._graph_unchecked = False
        return z, logits

    def gradient(self, z: torch.Tensor, loss: torch.Tensor, *, retain_graph: bool = True) -> torch.Tensor:
        """True gradient of ``loss`` w.r.t. the raw input (chain rule through the normalization), taken
        with the hooks inactive; ``retain_graph`` keeps the graph for the relevance pass."""
        composite = self._require_attached()
        with composite.inactive():
            (grad,) = torch.autograd.grad(loss, z, retain_graph=retain_graph)
        if self._norm is not None:
            grad = grad / self._norm[1].to(grad.dtype)
        return grad

    def relevance(
        self, z: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, *, scale_by_logit: bool = False
    ) -> torch.Tensor:
        """LRP relevance of z for ``target`` (one class index per sample), starting from a one-hot output.

        With ``scale_by_logit`` the output relevance is the target logit, so relevance sums to f_t(x).
        """
        self._require_attached()
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
            raise ValueError(f"target must hold class indices in [0, {logits.shape[1] - 1}]")
        output_relevance = torch.zeros_like(logits)
        output_relevance.scatter_(1, target.view(-1, 1), 1.0)
        if scale_by_logit:
            output_relevance = output_relevance * logits.detach()
        (relevance,) = torch.autograd.grad(logits, z, grad_outputs=output_relevance, retain_graph=False)
        return relevance

    def _require_attached(self) -> Composite:
        if self._active is None:
            raise RuntimeError("Relevance hooks are not attached; use `with relevance.attached(x):`")
        return self._active

    def __call__(self, x: torch.Tensor, target: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        """Relevance of each input value for its sample's target class, shaped and typed like ``x``."""
        target_tensor = self._target_tensor(x, target)
        with self.attached(x):
            z, logits = self.forward(x)
            return self.relevance(z, logits, target_tensor).to(x.dtype).detach()

    def conservation(self, x: torch.Tensor, target: torch.Tensor | int | Sequence[int]) -> Conservation:
        """Conservation diagnostic: relevance sum vs the target logit, per sample (thesis eq. 2.16)."""
        target_tensor = self._target_tensor(x, target)
        with self.attached(x):
            z, logits = self.forward(x)
            relevance = self.relevance(z, logits, target_tensor, scale_by_logit=True)
        target_logit = logits.detach().gather(1, target_tensor.view(-1, 1)).squeeze(1)
        return Conservation(relevance.flatten(1).sum(1).detach(), target_logit)

    @staticmethod
    def _target_tensor(x: torch.Tensor, target: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        tensor = torch.as_tensor(target, device=x.device)
        if tensor.dim() == 0:
            tensor = tensor.expand(x.shape[0])
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.shape != (x.shape[0],):
            raise ValueError(
                f"target must be one integer class index per sample ({x.shape[0]}); got shape "
                f"{tuple(tensor.shape)}, dtype {tensor.dtype}"
            )
        return tensor.long()


def loss_fn_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: per-sample gradients do not shrink with the batch size (as ART's and IFGSM's)."""
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
