"""LRP signatures: the relevance of the last layer's input for one class, a vector per sample.

Fidel et al. 2020 (seed 001 ref. 21) detect adversarial examples from SHAP signatures, the SHAP values of
the penultimate layer's neurons; seed 001 (section 3.3) takes "LRP signatures instead of SHAP ones and
applied the LRP on the last layer". For a last layer ``z = W a + b`` and class ``c`` that is LRP's epsilon
rule on that layer alone (Bach et al. 2015, eq. 58; Zennit's ``Epsilon``):

    R_j = a_j W_cj * R_c / (z_c + eps * sign(z_c)),    sign(0) = 1,

with the output relevance ``R_c = z_c``, the class's logit, so that a signature is in logit units like a
SHAP signature and sums to ``z_c`` less the bias's share. It is closed form, batched and differentiable in
x (the detector-aware attacks need that): one forward pass, no backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import checks
from .features import FeatureExtractor, check_layers, last_layer_of_type
from .model import Classifier

DEFAULT_EPSILON = 1e-6


@dataclass(frozen=True)
class Signatures:
    """Signatures (N, D) of a batch, the class each was taken for (N,), and the model's logits (N, K)."""

    values: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor


def lrp_signatures(
    model: nn.Module | Classifier,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    layer: str | None = None,
    epsilon: float = DEFAULT_EPSILON,
    batch_size: int = 256,
    differentiable: bool = False,
) -> Signatures:
    """The LRP signature of each sample of raw ``x`` for ``target`` (default: the predicted class).

    ``layer``: the model's last layer, an ``nn.Linear`` (default the last one it registers); its input is
    what the signature describes. ``differentiable=True`` keeps the graph (one batch, no chunking) so that
    a loss on the signatures can be differentiated in x. The model runs in eval mode, restored after; no
    hook stays registered; x is not modified.
    """
    classifier = Classifier.wrap(model)
    x = checks.check_batch(x)
    checks.positive_int("batch_size", batch_size)
    epsilon = checks.finite_number("epsilon", epsilon, low=0.0)
    linear = last_linear(classifier.module, layer)
    if target is not None:
        target = checks.check_labels(target, x.shape[0], linear[1].out_features, x.device)
    extractor = FeatureExtractor(classifier.module, [linear[0]], capture="input")
    chunks = [x] if differentiable or x.shape[0] == 0 else list(x.split(batch_size))
    parts, start = [], 0
    with extractor.capturing(detach=not differentiable) as captured, torch.set_grad_enabled(differentiable):
        for chunk in chunks:
            logits = classifier.logits(chunk)
            rows = None if target is None else target[start : start + len(chunk)]
            parts.append(epsilon_rule(captured.pop(linear[0]), linear[1], logits, rows, epsilon))
            start += len(chunk)
    return Signatures(*(torch.cat(values) for values in zip(*parts, strict=True)))


def last_linear(model: nn.Module, layer: str | None) -> tuple[str, nn.Linear]:
    """(name, module) of the layer a signature explains: ``layer``, else the model's last ``nn.Linear``;
    ValueError naming ``layer`` when it is not an ``nn.Linear``."""
    name = last_layer_of_type(model, nn.Linear) if layer is None else layer
    check_layers(model, [name])
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"layer: {name!r} is a {type(module).__name__}; an LRP signature needs an nn.Linear")
    return name, module


def epsilon_rule(
    inputs: torch.Tensor,
    linear: nn.Linear,
    logits: torch.Tensor,
    target: torch.Tensor | None,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signatures, target, logits) of one chunk: the epsilon rule on the last layer, R_c = z_c, for
    ``target`` (N,), or the class of the largest logit where it is None."""
    a = inputs.flatten(1).to(linear.weight.dtype)
    chosen = logits.detach().argmax(1) if target is None else target
    weights = linear.weight[chosen]  # (N, D): the row W_c of each sample's class
    z = (a * weights).sum(1) + (0.0 if linear.bias is None else linear.bias[chosen])
    stabilized = z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return a * weights * (z / stabilized).unsqueeze(1), chosen, logits
