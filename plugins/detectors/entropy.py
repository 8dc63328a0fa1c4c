"""Spatial-entropy detector (Amirian et al. 2018, seeds/000 sections 3.2 and 4.2, eqs. 3-4).

Adversarial inputs spread the network's focus: the guided-backprop feature response of a perturbed
image is less concentrated, so the local spatial entropy of its gray-scale, 8-bit version is higher.

Reading of the paper used here (section 3.2: "retaining the values of activated neurons at the final
convolutional layer, and backpropagating these activations to the original image"): the backward pass
starts at the output of ``layer`` (default: the last ``nn.Conv2d``) with ``grad_output`` equal to those
activations themselves, i.e. it is the guided-backprop gradient of ``0.5 * ||a||^2`` with ``a`` held
fixed as the seed, taken w.r.t. the model's input. ``target="logit"`` seeds it with the predicted
class's logit instead. The response is taken w.r.t. the model's own input (the normalized tensor when
``preprocessing=(mean, std)`` is given, the convention of :class:`~xaiadv.plugins.relevance.Relevance`).
Gray scale is the mean of the response over channels (the paper converts its RGB response to gray).
"""

from __future__ import annotations

import logging
import math

import torch
from sklearn.exceptions import NotFittedError
from torch import nn

from ..checks import check_batch
from ..features import FeatureExtractor, check_layers, last_layer_of_type
from ..relevance import Relevance

logger = logging.getLogger(__name__)

#: Signals the guided backward pass can start from.
TARGETS: tuple[str, ...] = ("activations", "logit")


def _check_patch(patch: object) -> int:
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 2:
        raise ValueError(f"patch must be an int >= 2 (the side of the square patch); got {patch!r}")
    return patch


def local_spatial_entropy(maps: torch.Tensor, patch: int = 3) -> torch.Tensor:
    """Entropy in bits of the value histogram of every ``patch x patch`` window (eq. 3), valid windows only.

    With P = patch**2 values in a window and c_i the number of its values equal to value i,
    S = -sum_v (n_v/P) log2(n_v/P) = log2(P) - mean_i log2(c_i): computed by ``unfold`` and pairwise
    equality counts, no loop over windows or samples (memory: P**2 booleans and P int32 per window).

    maps: (N, H, W) integer-valued (an integer dtype, or floats holding integers), e.g. from
    :func:`quantize_8bit`. Returns float64 (N, H - patch + 1, W - patch + 1).
    """
    patch = _check_patch(patch)
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be a torch.Tensor; got {type(maps).__name__}")
    if maps.dim() != 3:
        raise ValueError(f"maps must be shaped (N, H, W); got shape {tuple(maps.shape)}")
    n, height, width = maps.shape
    if height < patch or width < patch:
        raise ValueError(f"maps of size {height}x{width} are smaller than the {patch}x{patch} patch")
    if maps.is_floating_point() and maps.numel():
        if not bool(torch.isfinite(maps).all()) or not bool(torch.all(maps == maps.round())):
            raise ValueError("maps must hold integer values (quantize them first, e.g. with quantize_8bit)")
    elif maps.dtype == torch.bool or maps.is_complex():
        raise ValueError(f"maps must hold integer values; got dtype {maps.dtype}")
    area = patch * patch
    # (N, H', W', P) windows in the maps' own dtype (1 byte per value for quantize_8bit's uint8)
    windows = (
        maps.unfold(1, patch, 1).unfold(2, patch, 1).reshape(n, height - patch + 1, width - patch + 1, area)
    )
    counts = (windows.unsqueeze(-1) == windows.unsqueeze(-2)).sum(
        dim=-1, dtype=torch.int32
    )  # c_i per value i
    log_counts = torch.log2(torch.arange(1, area + 1, dtype=torch.float64, device=maps.device))
    entropy = math.log2(area) - log_counts[counts - 1].mean(dim=-1)
    return entropy.clamp_min(0.0)


def quantize_8bit(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample min-max scaling of (N, ...) maps to integers 0..255 (uint8), the gray image eq. 3 reads.

    Returns (quantized, degenerate): a map that is constant (all-zero included) or holds NaN/Inf has no
    meaningful scaling; it quantizes to all zeros (entropy 0, never NaN) and is flagged in
    ``degenerate`` (N,).
    Scaling is done in float64, so no finite range overflows.
    """
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be a torch.Tensor; got {type(maps).__name__}")
    if maps.dim() < 2:
        raise ValueError(f"maps must be a batch shaped (N, ...); got shape {tuple(maps.shape)}")
    flat = maps.detach().flatten(1).to(torch.float64)
    if flat.shape[1] == 0:
        raise ValueError(f"maps must not be empty per sample; got shape {tuple(maps.shape)}")
    finite = torch.isfinite(flat).all(dim=1)
    safe = torch.where(finite.unsqueeze(1), flat, torch.zeros_like(flat))
    low, high = safe.min(dim=1, keepdim=True).values, safe.max(dim=1, keepdim=True).values
    span = high - low
    degenerate = ~finite | (span[:, 0] <= 0) | ~torch.isfinite(span[:, 0])
    scale = torch.where(degenerate.unsqueeze(1), torch.ones_like(span), span)
    scaled = ((safe - low) / scale * 255.0).round().clamp_(0.0, 255.0)
    scaled[degenerate] = 0.0
    return scaled.to(torch.uint8).reshape(maps.shape), degenerate


class SpatialEntropy:
    """Amirian et al. 2018: mean local spatial entropy of the guided-backprop feature response (eqs. 3-4).

    ``SpatialEntropy(model).fit(x_clean).score(x)`` gives one number per sample, higher meaning more
    likely adversarial (the paper: adversarial inputs spread the network's focus). Nothing is learned;
    ``fit`` records the clean scores' ``clean_mean_``, ``clean_std_`` and ``clean_degenerate_rate_``.
    Inputs are image batches (N, C, H, W); responses are (N, H, W) gray maps at input resolution.

    layer: name of the layer whose output seeds the backward pass (default: the last ``nn.Conv2d``).
    target: "activations" (the paper: the layer's activations themselves as ``grad_output``) or
    "logit" (the predicted class's logit, one-hot ``grad_output``). patch: side of the entropy window
    (3 in the paper). preprocessing: ``(mean, std)`` applied before the model, as in Relevance.
    The model is in eval mode for the work and restored after; no hook outlives a call.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | None = None,
        target: str = "activations",
        patch: int = 3,
        batch_size: int = 128,
        preprocessing: object = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
        self.patch = _check_patch(patch)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be an int > 0; got {batch_size!r}")
        # Relevance refuses a model without activation modules (functional calls) for guided backprop.
        self._relevance = Relevance(model, "guided_backprop", preprocessing=preprocessing)
        if not any(isinstance(module, nn.ReLU) for module in model.modules()):
            raise ValueError(
                "guided backprop rewrites the gradients of torch.nn.ReLU modules and the model has none "
                "(activations called functionally, or other activation types): the response would silently "
                "equal the plain gradient"
            )
        if layer is None:
            layer = last_layer_of_type(model, nn.Conv2d)
        elif not isinstance(layer, str):
            raise ValueError(f"layer must be a layer name (str) or None; got {layer!r}")
        check_layers(model, [layer])
        self._extractor = FeatureExtractor(model, [layer])
        self.model = model
        self.layer = layer
        self.target = target
        self.batch_size = batch_size
        self.preprocessing = preprocessing

    def __repr__(self) -> str:
        return (
            f"SpatialEntropy(layer={self.layer!r}, target={self.target!r}, patch={self.patch}, "
            f"batch_size={self.batch_size})"
        )

    def fit(self, x: torch.Tensor, y: object = None) -> SpatialEntropy:
        """Record clean-score statistics (nothing to learn); ``y`` is unused (scikit-learn shape)."""
        x = self._check_x(x)
        if x.shape[0] == 0:
            raise ValueError("fit needs at least one clean sample; got an empty batch")
        scores, degenerate = self._scores(x)
        self.input_shape_ = tuple(x.shape[1:])
        self.n_features_in_ = math.prod(self.input_shape_)
        self.clean_mean_ = float(scores.mean())
        self.clean_std_ = float(scores.std(correction=0))
        self.clean_degenerate_rate_ = float(degenerate.double().mean())
        return self

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """Gray-scale guided-backprop feature response (N, H, W): the (N, C, H, W) response's channel mean."""
        x = self._check_x(x)
        parts = [self._response(x[start : start + self.batch_size]) for start in self._starts(x)]
        return torch.cat(parts) if parts else x.new_zeros(0, *x.shape[2:])

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """For a person to look at: "response" (N, H, W), "quantized" (N, H, W) uint8, "entropy"
        (N, H', W') float64 with H' = H - patch + 1, "degenerate" (N,) bool (constant, zero or non-finite)."""
        x = self._check_x(x)
        parts = [self._maps(x[start : start + self.batch_size]) for start in self._starts(x)]
        if not parts:
            parts = [self._maps_of(x.new_zeros(0, *x.shape[2:]))]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Mean local spatial entropy per sample (eq. 4), float64 (N,): higher = more likely adversarial."""
        if not hasattr(self, "clean_mean_"):
            raise NotFittedError("SpatialEntropy is not fitted; call fit(x_clean) first")
        x = self._check_x(x)
        if tuple(x.shape[1:]) != self.input_shape_:
            raise ValueError(f"x must be shaped (N, *{self.input_shape_}) as in fit; got {tuple(x.shape)}")
        return self._scores(x)[0]

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = [torch.zeros(0, dtype=torch.float64, device=x.device)]
        degenerate = [torch.zeros(0, dtype=torch.bool, device=x.device)]
        for start in self._starts(x):
            found = self._maps(x[start : start + self.batch_size])
            scores.append(found["entropy"].flatten(1).mean(dim=1))
            degenerate.append(found["degenerate"])
        flagged = torch.cat(degenerate)
        if bool(flagged.any()):
            logger.warning(
                "%d of %d feature responses are degenerate (constant or non-finite): score 0",
                int(flagged.sum()),
                len(flagged),
            )
        return torch.cat(scores), flagged

    def _maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._maps_of(self._response(x))

    def _maps_of(self, response: torch.Tensor) -> dict[str, torch.Tensor]:
        quantized, degenerate = quantize_8bit(response)
        entropy = local_spatial_entropy(quantized, self.patch)
        return {"response": response, "quantized": quantized, "entropy": entropy, "degenerate": degenerate}

    def _response(self, x: torch.Tensor) -> torch.Tensor:
        """Guided backprop of one batch to the model input, averaged over channels."""
        with torch.enable_grad(), self._relevance.attached(x) as relevance:
            with self._extractor.capturing(detach=False) as captured:
                z, logits = relevance.forward(x)
            if self.layer not in captured:
                raise ValueError(f"layer {self.layer!r} did not run in the model's forward pass")
            if self.target == "logit":
                response = relevance.relevance(z, logits, logits.detach().argmax(dim=1))
            else:
                activations = captured[self.layer]
                if not isinstance(activations, torch.Tensor) or activations.grad_fn is None:
                    raise ValueError(
                        f"layer {self.layer!r} output does not depend on the input; pick another layer"
                    )
                (response,) = torch.autograd.grad(activations, z, grad_outputs=activations.detach())
        return response.detach().mean(dim=1)

    def _starts(self, x: torch.Tensor) -> range:
        return range(0, x.shape[0], self.batch_size)

    def _check_x(self, x: object) -> torch.Tensor:
        x = check_batch(x)
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch shaped (N, C, H, W); got shape {tuple(x.shape)}")
        if x.shape[2] < self.patch or x.shape[3] < self.patch:
            raise ValueError(
                f"x images of size {x.shape[2]}x{x.shape[3]} are smaller than the patch ({self.patch})"
            )
        return x
