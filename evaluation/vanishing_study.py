"""Vanishing gradients (thesis 4.2.4, Table 4.2, Algorithm 8; LRP-mean of 3.2): the library core.

The thesis found that 60.9% of its dogs-vs-cats images had an all-zero initial loss gradient (eq. 2.30):
its classifier ends in a Dense layer with a softmax activation, which saturates, so IFGSM cannot move
those images, while LRP-mean, which needs no gradient, reaches the highest ASR there. This module builds
that setting from any logit model and measures it:

- :class:`SoftmaxOutput`: the model with a softmax inside, ``softmax(logit_scale * f(x))``; with
  ``softmax=False`` the same network without it, ``logit_scale * f(x)`` (the "logit model"). The scale
  (an inverse temperature) changes no prediction; it emulates a more confident network on small data
  sets whose margins never saturate float32 (digits' reference CNN: median top-2 margin 2.3).
- The attacks see the softmax model's probabilities as their logits (cross-entropy over the outputs, as
  our attacks and ART's ``PyTorchClassifier(loss=CrossEntropyLoss())`` compute it for a model handed over
  with its softmax); they warn about it (``plugins.checks.looks_like_probabilities``), and that warning is
  the point of the experiment, so it is recorded, not silenced.
- "All-zero gradient": every entry of the float32 input gradient of that loss is == 0 (signed zeros
  included). Through PyTorch's softmax backward, p * (g - <g, p>), this happens exactly when the float32
  softmax is exactly one-hot. Algorithm 8 tests ``sum(A) = 0``; we test every entry, since a sign pattern
  can sum to zero without vanishing. The logit model's cross-entropy vanishes under the same condition for
  a correctly classified sample (its gradient p - onehot(y) is zero once its own float32 softmax is
  one-hot, a margin above ~104), so in float32 the two models differ there only on misclassified samples
  and by underflow. The thesis's Keras loss clips probabilities to [1e-7, 1 - 1e-7], whose gradient is
  zero already from p_y >= 1 - 1e-7 (a margin of ~16): that, not the softmax alone, is its Table 4.2.
- Relevance of the softmax model passes the softmax unchanged (zennit ``Pass``): the thesis's LRP reads the
  dense layers' weights and inputs and puts the one-hot relevance on the last layer's output before its
  activation. Through the softmax Jacobian, relevance would vanish with the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from zennit.composites import LayerMapComposite, MixedComposite
from zennit.core import Composite
from zennit.rules import Pass

from xaiadv.plugins import checks
from xaiadv.plugins.relevance import DEFAULT_COMPOSITE, build_composite, check_composite


class SoftmaxOutput(nn.Module):
    """``softmax(logit_scale * model(x))`` over classes (dim 1), or ``logit_scale * model(x)`` without the
    softmax. The caller's model is held, never changed; eval/train reach it as for any submodule."""

    def __init__(self, model: nn.Module, logit_scale: float = 1.0, *, softmax: bool = True) -> None:
        super().__init__()
        self.model = checks.module("model", model)
        self.logit_scale = checks.finite_number("logit_scale", logit_scale, low=0.0, low_open=True)
        self.softmax = nn.Softmax(dim=1) if checks.boolean("softmax", softmax) else nn.Identity()
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.model(x) * self.logit_scale)


def zero_gradient_mask(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """Per sample (N,) bool: is every entry of the input gradient of the attacks' loss exactly zero?

    The loss is ``cross_entropy(model(x), y)`` summed (what our attacks and ART's IFGSM differentiate,
    eq. 2.30), on ``model``'s outputs as they are: the probabilities of a :class:`SoftmaxOutput`.
    x: (N, ...) float inputs; y: (N,) class indices. The model is used in eval mode and restored.
    """
    x = checks.check_batch(x)
    y = checks.check_labels(y, x.shape[0], None, x.device)
    checks.positive_int("batch_size", batch_size)
    was_training = model.training
    masks = []
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            rows = x[start : start + batch_size].detach().clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(rows), y[start : start + batch_size], reduction="sum")
            (gradient,) = torch.autograd.grad(loss, rows)
            masks.append((gradient.flatten(1) == 0).all(1))
    finally:
        model.train(was_training)
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=x.device)


def softmax_pass_composite(
    composite: str = DEFAULT_COMPOSITE, *, sample: torch.Tensor, bounds: tuple[float, float] = (0.0, 1.0)
) -> Composite:
    """A fresh zennit Composite: ``composite``'s rules, with relevance passing every ``nn.Softmax`` unchanged.

    So the relevance of a :class:`SoftmaxOutput` equals that of the same network without the softmax (the
    thesis's layer-wise LRP); ``sample`` (1, ...) sets the box of ``epsilon_gamma_box``. No canonizers: the
    reference CNN has no BatchNorm (a model with one is refused by the relevance pass, naming the layers).
    """
    check_composite(composite)
    if isinstance(composite, Composite):
        raise ValueError("composite: give a composite name; a Composite instance is used as it is")
    low, high = checks.check_bounds(bounds)
    box = (torch.full_like(sample[:1], low), torch.full_like(sample[:1], high))
    return MixedComposite([LayerMapComposite([(nn.Softmax, Pass())]), build_composite(composite, [], box)])


@dataclass(frozen=True)
class ZeroGradientShare:
    """The share of samples with an all-zero gradient (Table 4.2's number), and its count; None if n = 0."""

    n: int
    n_zero: int

    @property
    def share(self) -> float | None:
        return None if self.n == 0 else self.n_zero / self.n

    def to_dict(self) -> dict[str, float | int | None]:
        return {"n": self.n, "n_zero": self.n_zero, "share": self.share}


def zero_gradient_share(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> ZeroGradientShare:
    """Thesis Table 4.2 for ``x``: how many samples have an all-zero input gradient
    (:func:`zero_gradient_mask`)."""
    mask = zero_gradient_mask(model, x, y, batch_size=batch_size)
    return ZeroGradientShare(len(mask), int(mask.sum()))
