"""Batched LRP relevance from Zennit composites, and the model session the attacks share.

Relevance is computed in the model's own input space: when the caller's inputs are normalized by
``(x - mean) / std`` before the model, the normalized tensor is the leaf the hooks attribute to, and
the relevance of an input value is that of its normalized twin (element-wise, never scaled by 1/std,
which would distort the ranking across channels). Loss gradients are taken through the same forward
with the hooks switched off (``composite.inactive()``): gradients taken while they are active are
relevance, not gradients.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
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
        self._norm: Preprocessing = None
        self._check_activation_modules()

    def _check_activation_modules(self) -> None:
        """Refuse or warn when activations are functional calls the hooks cannot see.

        Guided backprop rewrites activation gradients, so without activation modules it would silently be
        the plain gradient: refused. LRP rules pass relevance through activations; for ReLU a functional
        call gates relevance exactly as the Pass rule does, other functional activations would not: warned.
        """
        if not isinstance(self.composite, str):
            return
        has_weights = any(isinstance(m, (Convolution, nn.Linear)) for m in self.model.modules())
        has_activations = any(isinstance(m, Activation) for m in self.model.modules())
        if not has_weights or has_activations:
            return
        message = (
            "model has no activation modules (torch.nn.ReLU, ...): its activations are functional calls "
            "the relevance hooks cannot see"
        )
        if self.composite == "guided_backprop":
            raise ValueError(message + "; guided backprop would silently equal the plain gradient.")
        warnings.warn(
            message + "; relevance is exact for ReLU only. Use activation modules.", UserWarning, stacklevel=3
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
                yield self
            finally:
                self._active = None
                composite.remove()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward through the hooked model: returns (normalized leaf z, logits).

        z requires grad; the gradient and relevance backward passes both start from these logits.
        """
        self._require_attached()
        z = self.normalize(x).to(self.param_dtype).detach().requires_grad_(True)
        return z, self.model(z)

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
        if tensor.dtype.is_floating_point or tensor.shape != (x.shape[0],):
            raise ValueError(
                f"target must be one class index per sample ({x.shape[0]}); got shape {tuple(tensor.shape)}"
            )
        return tensor.long()


def loss_fn_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: per-sample gradients do not shrink with the batch size (as ART's and IFGSM's)."""
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
