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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import Node
from zennit.canonizers import Canonizer
from zennit.composites import COMPOSITES
from zennit.core import Composite
from zennit.types import Activation, BatchNorm, Convolution

from .canonize import (
    PROBE_SAMPLES,
    check_canonized,
    default_canonizers,
    forward_errors_named,
    model_restored,
)
from .checks import as_output
from .graph import ModuleNodes, inspect_graph, module_nodes
from .model import Classifier
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


def check_canonizers(canonizers: object) -> None:
    """Refuse ``canonizers`` unless it is a sequence of zennit Canonizer instances."""
    if isinstance(canonizers, (str, bytes)) or not isinstance(canonizers, Sequence):
        raise TypeError(f"canonizers must be a list of zennit Canonizers or None; got {canonizers!r}")
    wrong = [type(item).__name__ for item in canonizers if not isinstance(item, Canonizer)]
    if wrong:
        raise TypeError(f"canonizers must be zennit Canonizer instances; got {', '.join(wrong)}")


def _check_device(model: nn.Module, like: torch.Tensor) -> None:
    """Refuse inputs on another device than the model's parameters and buffers, naming both."""
    tensor = next(iter(model.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(model.buffers()), None)
    if tensor is not None and tensor.device != like.device:
        raise ValueError(
            f"x is on device {like.device} but the model's parameters are on {tensor.device}; "
            f"move x (x.to({str(tensor.device)!r})) or the model to one device"
        )


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
    even after an exception. ``model`` is a :class:`Classifier`, or a plain module wrapped with ``bounds``
    (default (0, 1), the raw inputs' range: the box of ``epsilon_gamma_box``) and ``preprocessing=(mean,
    std)``, applied before the model; relevance is attributed to the normalized input, mapped back
    element-wise. ``fast_rules=False`` uses Zennit's stock rules.

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
        model: nn.Module | Classifier,
        composite: str | Composite = DEFAULT_COMPOSITE,
        *,
        canonizers: Sequence[Canonizer] | None = None,
        preprocessing: object = None,
        bounds: tuple[float, float] | None = None,
        fast_rules: bool = True,
    ) -> None:
        self.classifier = Classifier.wrap(model, bounds=bounds, preprocessing=preprocessing)
        check_composite(composite)
        if canonizers is not None and isinstance(composite, Composite):
            raise ValueError(
                "canonizers= applies to named composites; build your Composite with canonizers=[...]"
            )
        self.model = self.classifier.module
        self.composite = composite
        #: The caller's canonizers (a Composite's own); None: chosen by data flow when attached.
        self.canonizers = list(composite.canonizers) if isinstance(composite, Composite) else canonizers
        if self.canonizers is not None:
            check_canonizers(self.canonizers)
        self.bounds = self.classifier.bounds
        self.fast_rules = fast_rules
        self._active: Composite | None = None
        self._graph_unchecked = False
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

    def _check_graph(self, z: torch.Tensor, logits: torch.Tensor, nodes: ModuleNodes) -> None:
        """Refuse or warn about what the first forward's graph shows the hooks cannot handle (nothing to
        inspect when the logits do not depend on z)."""
        if logits.grad_fn is None:
            return
        findings = inspect_graph(z, logits.grad_fn, nodes.activation)
        if findings.merges and self.composite != "guided_backprop":  # a gradient method: merges are exact
            self._check_merges(findings.merges, nodes)
        if findings.functional_activations and isinstance(self.composite, str):
            self._check_functional(findings.functional_activations)

    def _check_merges(self, merges: tuple[Node, ...], nodes: ModuleNodes) -> None:
        """Refuse (named composite) or warn (Composite instance) about branch merges no module computes.

        No rule sees such a merge, so relevance flows through it as a gradient: a residual h + f(h) hands
        each branch the full relevance and doubles it (thesis eq. 2.16 fails). A canonizer turns the merge
        into a module a rule handles. The message names the module whose forward computes each merge.
        """
        places = sorted({f"{node.name()} in {nodes.describe(node, self.model)}" for node in merges})
        shown = "; ".join(places[:3]) + (f"; and {len(places) - 3} more" if len(places) > 3 else "")
        message = (
            f"model merges two input-dependent branches in {len(merges)} elementwise op(s) written in a "
            f"forward, not as modules ({shown}), as a hand-written residual h + f(h) does: LRP would pass "
            "relevance into both branches as a gradient and not conserve it. Pass canonizers=[...] that turn "
            "each merge into a module Zennit's rules handle (zennit.layer.Sum over torch.stack, as "
            "zennit.torchvision.ResNetCanonizer does), or n_batch=1.0 for an attack (no relevance needed)"
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
        return self.classifier.normalize(x)

    @property
    def param_dtype(self) -> torch.dtype:
        """The model's floating dtype (float32 when it has no parameters)."""
        return self.classifier.dtype

    @contextmanager
    def attached(self, like: torch.Tensor) -> Iterator[Relevance]:
        """Register canonizers and hooks once, in eval mode; undo both on exit, even after an exception.

        ``like`` is an input batch: it sets the device and the shape of the preprocessing tensors, and its
        first samples are the probe that chooses the BatchNorm merges (by data flow) and proves that the
        canonized model computes the original logits. Every parameter, buffer, submodule, attribute and
        hook is as before on exit, also when a canonizer or hook raised half-way (:func:`model_restored`).
        """
        if self._active is not None:
            yield self
            return
        _check_device(self.model, like)
        low, high = (  # one sample's shape, so that any preprocessing the batch takes broadcasts over it
            torch.full_like(like[:1], bound, dtype=torch.float64) for bound in self.bounds
        )
        box = (self.normalize(low).to(self.param_dtype), self.normalize(high).to(self.param_dtype))
        with eval_mode(self.model), model_restored(self.model):
            with forward_errors_named(like):
                canonizers = self._canonizers_checked(
                    self.normalize(like[:PROBE_SAMPLES]).to(self.param_dtype)
                )
            composite = build_composite(self.composite, canonizers, box, fast_rules=self.fast_rules)
            try:
                composite.register(self.model)
                self._active = composite
                self._check_merged(composite)
                self._graph_unchecked = isinstance(self.composite, str) or bool(composite.hook_refs)
                yield self
            finally:
                self._active = None
                composite.remove()

    def _canonizers_checked(self, z: torch.Tensor) -> list[Canonizer]:
        """The canonizers for this model (the caller's, or chosen by data flow from a forward of ``z``),
        refused unless the canonized model computes the same logits on ``z``."""
        if self.canonizers is None:
            refuse = self.composite != "guided_backprop"  # a gradient method is exact through a BatchNorm
            canonizers = default_canonizers(self.model, z, refuse_unmergeable=refuse)
        else:
            canonizers = list(self.canonizers)
        if canonizers:
            with torch.no_grad():
                reference = as_output(self.model(z))
            check_canonized(self.model, z, reference, canonizers)
        return canonizers

    def _check_merged(self, composite: Composite) -> None:
        """Refuse BatchNorms the caller's canonizers left in place under LRP rules (not conserving)."""
        if self.canonizers is None or not composite.hook_refs or self.composite == "guided_backprop":
            return
        unmerged = _unmerged_batchnorms(self.model)
        if unmerged:
            raise ValueError(
                f"BatchNorm layers {unmerged} are not merged into a linear layer by the canonizers given, so "
                "relevance would not be conserved; pass canonizers=[...] that merge them (for a Composite: "
                "build it with them), or canonizers=None to merge by data flow"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward through the hooked model: returns (normalized leaf z, logits).

        z requires grad; the gradient and relevance backward passes both start from these logits. The first
        forward with gradients in an attached context has its graph inspected (once: an attack loop does
        not pay it per iteration), which may raise a ValueError or warn (see the class docstring). An output
        other than one tensor (a tuple, a dict) is a TypeError.
        """
        self._require_attached()
        z = self.normalize(x).to(self.param_dtype).detach().requires_grad_(True)
        if not (self._graph_unchecked and torch.is_grad_enabled()):
            return z, as_output(self.model(z))
        with module_nodes(self.model) as nodes:
            logits = as_output(self.model(z))
        self._check_graph(z, logits, nodes)
        self._graph_unchecked = False
        return z, logits

    def gradient(self, z: torch.Tensor, loss: torch.Tensor, *, retain_graph: bool = True) -> torch.Tensor:
        """True gradient of ``loss`` w.r.t. the raw input (chain rule through the normalization), taken
        with the hooks inactive; ``retain_graph`` keeps the graph for the relevance pass."""
        composite = self._require_attached()
        with composite.inactive():
            (grad,) = torch.autograd.grad(loss, z, retain_graph=retain_graph)
        std = self.classifier.std_for(grad)
        return grad if std is None else grad / std.to(grad.dtype)

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
