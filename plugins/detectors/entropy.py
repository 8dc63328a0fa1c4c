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

``score_torch`` (issue 14, for detector-aware attacks) is BPDA (Athalye et al. 2018): its value is the exact
score, its gradient that of :meth:`SpatialEntropy.soft_score`, a surrogate equal to the score in its limit.
Three steps of the score have no useful gradient, and each gets a stand-in in the backward pass only:
- eq. 3 counts equal values per window, a piecewise-constant function: the counts become soft counts
  (:func:`~xaiadv.plugins.surrogates.soft_count_entropy`, Gaussian kernels of width ``bandwidth`` gray levels;
  exact as the bandwidth -> 0);
- the 8-bit rounding: identity backward (forward exact);
- the ReLU gates of guided backprop, 1[z > 0]: a ReLU network's response is piecewise constant in x through
  them (its seed aside), so with ``target="logit"`` (a constant one-hot seed) the exact gradient is zero on
  every sample; with the paper's seed (the layer's activations, piecewise linear in x) it is non-zero but
  blind to where the gates switch. Backward, each gate is differentiated as sigmoid(z / gate_temperature)
  (forward exact). The response itself is a gradient, so the surrogate is differentiated by double backprop
  (``create_graph=True``) through ReLUs whose guided backward is written in differentiable torch ops.
The min-max scaling to 0..255 keeps its exact (piecewise-linear) gradient.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import checks
from ..checks import as_output, check_batch
from ..features import FeatureExtractor, check_layers, last_layer_of_type
from ..model import Classifier
from ..relevance import Relevance
from ..surrogates import soft_count_entropy
from .base import Detector, Parts

logger = logging.getLogger(__name__)

#: Signals the guided backward pass can start from.
TARGETS: tuple[str, ...] = ("activations", "logit")


def _check_patch(patch: object) -> int:
    if checks.positive_int("patch", patch) < 2:
        raise ValueError(f"patch must be an int >= 2 (the side of the square patch); got {patch!r}")
    return int(patch)


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


class _GuidedReLU(torch.autograd.Function):
    """ReLU with guided backprop's backward (Springenberg et al. 2015): the incoming gradient's positive part,
    gated by 1[z > 0], z read from ``gate_input`` (the same ReLU's input in a plain forward pass, so that a
    second differentiation reaches x through true ReLU gradients). The gate's value is exact; its derivative
    in z is that of sigmoid(z / temperature) (BPDA: the exact gate's is zero almost everywhere). Written in
    differentiable ops, not ``once_differentiable``: the response can be differentiated (double backprop)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, gate_input: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(gate_input)
        ctx.temperature = temperature
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (z,) = ctx.saved_tensors
        smooth = torch.sigmoid(z / ctx.temperature)
        gate = (z > 0).to(grad.dtype) + (smooth - smooth.detach())
        return grad.clamp(min=0) * gate, None, None


@contextmanager
def _relu_inputs(model: nn.Module) -> Iterator[dict[nn.Module, list[torch.Tensor]]]:
    """Every ``nn.ReLU``'s input, per module in call order, recorded for the block; a clone runs the module,
    so that an in-place ReLU leaves the record intact. The hooks go on exit, even after an exception."""
    seen: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        seen[module].append(inputs[0])
        return (inputs[0].clone(),)

    handles = [m.register_forward_pre_hook(keep) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _guided_relus(
    model: nn.Module, gate_inputs: dict[nn.Module, list[torch.Tensor]], temperature: float
) -> Iterator[None]:
    """Every ``nn.ReLU`` computes :class:`_GuidedReLU` for the block, its gate read from ``gate_inputs``
    (:func:`_relu_inputs` of a plain pass, consumed in call order); the hooks go on exit, even after an
    exception."""
    with _relu_inputs(model) as seen:

        def guide(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return _GuidedReLU.apply(seen[module].pop(), gate_inputs[module].pop(0), temperature)

        handles = [m.register_forward_hook(guide) for m in model.modules() if isinstance(m, nn.ReLU)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class SpatialEntropy(Detector):
    """Amirian et al. 2018: mean local spatial entropy of the guided-backprop feature response (eqs. 3-4).

    ``SpatialEntropy(model).fit(x_clean).calibrate(x_held_out).detect(x)``; ``score(x)`` gives one number
    per sample, higher meaning more likely adversarial (the paper: adversarial inputs spread the network's
    focus). Nothing is learned; ``fit`` records the clean scores' ``clean_mean_``, ``clean_std_`` and
    ``clean_degenerate_rate_``, and ``n_classes_``. Inputs are image batches (N, C, H, W); responses are
    (N, H, W) gray maps at input resolution.

    layer: name of the layer whose output seeds the backward pass (default: the last ``nn.Conv2d``).
    target: "activations" (the paper: the layer's activations themselves as ``grad_output``) or
    "logit" (the predicted class's logit, one-hot ``grad_output``). patch: side of the entropy window
    (3 in the paper). model: a Classifier, or a module with ``preprocessing=(mean, std)`` applied before it.
    bandwidth (gray levels) and gate_temperature (units of the ReLUs' inputs): the surrogate's widths that
    ``score_torch``'s gradient follows (module docstring; defaults measured for the detector-aware attack);
    they change no score, so they are not part of the saved configuration.
    """

    config_names = ("layer", "target", "patch", "bandwidth", "gate_temperature")

    def __init__(
        self,
        model: Classifier | nn.Module,
        *,
        layer: str | None = None,
        target: str = "activations",
        patch: int = 3,
        batch_size: int = 128,
        preprocessing: object = None,
        bandwidth: float = 1.0,
        gate_temperature: float = 1.0,
    ) -> None:
        checks.one_of("target", target, TARGETS)
        self.bandwidth = checks.finite_number("bandwidth", bandwidth, low=0.0, low_open=True)
        self.gate_temperature = checks.finite_number(
            "gate_temperature", gate_temperature, low=0.0, low_open=True
        )
        self.patch = _check_patch(patch)
        super().__init__(model, batch_size=batch_size, preprocessing=preprocessing)
        module = self.classifier.module
        # Relevance refuses a model without activation modules (functional calls) for guided backprop.
        self._relevance = Relevance(self.classifier, "guided_backprop")
        if not any(isinstance(item, nn.ReLU) for item in module.modules()):
            raise ValueError(
                "guided backprop rewrites the gradients of torch.nn.ReLU modules and the model has none "
                "(activations called functionally, or other activation types): the response would silently "
                "equal the plain gradient"
            )
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"layer must be a layer name (str) or None; got {layer!r}")
        self._layer = last_layer_of_type(module, nn.Conv2d) if layer is None else layer
        check_layers(module, [self._layer])
        self._extractor = FeatureExtractor(module, [self._layer])
        self.layer = layer
        self.target = target

    def _fit(self, x: torch.Tensor, y: object) -> None:
        """Record clean-score statistics (nothing to learn); ``y`` is unused (scikit-learn shape)."""
        x = self._check_x(x)
        if x.shape[0] == 0:
            raise ValueError("fit needs at least one clean sample; got an empty batch")
        found = self._batched(x)
        scores, degenerate = found["score"], found["degenerate"]
        with torch.no_grad():
            self.n_classes_ = int(self.classifier.logits(x[:1]).shape[1])
        self.input_shape_ = tuple(x.shape[1:])
        self.n_features_in_ = math.prod(self.input_shape_)
        self.clean_mean_ = float(scores.mean())
        self.clean_std_ = float(scores.std(correction=0))
        self.clean_degenerate_rate_ = float(degenerate.double().mean())

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """Gray-scale guided-backprop feature response (N, H, W): the (N, C, H, W) response's channel mean."""
        x = self._check_x(x)
        with self.classifier.evaluating():
            parts = [self._response(x[start : start + self.batch_size])[0] for start in self._starts(x)]
        return torch.cat(parts) if parts else x.new_zeros(0, *x.shape[2:])

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """For a person to look at: "response" (N, H, W), "quantized" (N, H, W) uint8, "entropy"
        (N, H', W') float64 with H' = H - patch + 1, "degenerate" (N,) bool (constant, zero or non-finite)."""
        x = self._check_x(x)
        with self.classifier.evaluating():
            parts = [
                self._maps_of(self._response(x[start : start + self.batch_size])[0])
                for start in self._starts(x)
            ]
        if not parts:
            parts = [self._maps_of(x.new_zeros(0, *x.shape[2:]))]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`score` (N,) float64 with :meth:`soft_score`'s gradient in ``x`` (BPDA, module docstring):
        the value a detector-aware attack compares with the threshold is the detector's own."""
        exact = self.score(x)
        soft = self.soft_score(x)
        return exact + (soft - soft.detach())

    def soft_score(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate of eq. 4 (N,) float64: soft-count entropy (eq. 3) of the rounded 8-bit response.

        Equal to :meth:`score` as the bandwidth -> 0 (the counts become exact; the rounding and the gates
        are exact in the forward pass); differentiable in ``x`` by double backprop through
        :meth:`response_torch`. A degenerate response (constant or non-finite) scores 0, as in :meth:`score`.
        """
        self._check_fitted()
        x = check_batch(x, input_shape=self.input_shape_)
        with self.classifier.evaluating():
            parts = [self._soft_scores(x[start : start + self.batch_size]) for start in self._starts(x)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=x.device)

    def response_torch(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`response` (N, H, W) with a graph to ``x`` (``create_graph=True``): the same values, and the
        gradient of the guided-backprop map with the gates' BPDA derivative (module docstring)."""
        x = self._check_x(x)
        with self.classifier.evaluating():
            parts = [self._response_torch(x[start : start + self.batch_size]) for start in self._starts(x)]
        return torch.cat(parts) if parts else x.new_zeros(0, *x.shape[2:])

    def _soft_scores(self, x: torch.Tensor) -> torch.Tensor:
        """One batch of :meth:`soft_score`: quantize_8bit's scaling, its rounding by identity backward."""
        flat = self._response_torch(x).flatten(1).to(torch.float64)
        finite = torch.isfinite(flat).all(dim=1, keepdim=True)
        flat = torch.where(finite, flat, torch.zeros_like(flat))  # degenerate: a constant row, entropy 0
        low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
        span = high - low
        scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span)) * 255.0
        rounded = (scaled + (scaled.round() - scaled).detach()).reshape(len(x), *x.shape[2:])
        patch = self.patch
        windows = rounded.unfold(1, patch, 1).unfold(2, patch, 1).reshape(-1, patch * patch)
        return soft_count_entropy(windows, bandwidth=self.bandwidth).view(len(x), -1).mean(dim=1)

    def _response_torch(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_response`'s map kept in the graph, from two forward passes (not Zennit's hooks: their
        backward is not differentiable). A plain pass gives the seed (the activations, not detached) and
        every ReLU's input for the gates; a guided pass (:class:`_GuidedReLU`) is differentiated to the input.
        A second differentiation so reaches x through the seed and the gates by the model's true gradient."""
        module = self.classifier.module
        with torch.enable_grad():
            z = self.classifier.normalize(x).to(self.classifier.dtype)
            if not z.requires_grad:  # a value only: the graph starts here
                z = z.detach().requires_grad_(True)
            with _relu_inputs(module) as gate_inputs, self._extractor.capturing(detach=False) as plain:
                module(z)
            guiding = _guided_relus(module, gate_inputs, self.gate_temperature)
            with guiding, self._extractor.capturing(detach=False) as guided:
                logits = as_output(module(z))
            if self._layer not in guided:
                raise ValueError(f"layer {self._layer!r} did not run in the model's forward pass")
            if self.target == "logit":
                outputs = logits
                seed = torch.zeros_like(logits).scatter_(1, logits.detach().argmax(1, keepdim=True), 1.0)
            else:
                outputs, seed = guided[self._layer], plain[self._layer]
            (response,) = torch.autograd.grad(outputs, z, grad_outputs=seed, create_graph=True)
        return response.mean(dim=1)

    def _parts(self, x: torch.Tensor) -> Parts:
        """Eq. 4 per sample: the mean local spatial entropy, float64 (N,); and the predicted class."""
        self._check_x(x)
        found = self._batched(x)
        return {"score": found["score"], "class": found["class"]}

    def _batched(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = [torch.zeros(0, dtype=torch.float64, device=x.device)]
        degenerate = [torch.zeros(0, dtype=torch.bool, device=x.device)]
        classes = [torch.zeros(0, dtype=torch.long, device=x.device)]
        for start in self._starts(x):
            response, prediction = self._response(x[start : start + self.batch_size])
            found = self._maps_of(response)
            scores.append(found["entropy"].flatten(1).mean(dim=1))
            degenerate.append(found["degenerate"])
            classes.append(prediction)
        flagged = torch.cat(degenerate)
        if bool(flagged.any()):
            logger.warning(
                "%d of %d feature responses are degenerate (constant or non-finite): score 0",
                int(flagged.sum()),
                len(flagged),
            )
        return {"score": torch.cat(scores), "degenerate": flagged, "class": torch.cat(classes)}

    def _maps_of(self, response: torch.Tensor) -> dict[str, torch.Tensor]:
        quantized, degenerate = quantize_8bit(response)
        entropy = local_spatial_entropy(quantized, self.patch)
        return {"response": response, "quantized": quantized, "entropy": entropy, "degenerate": degenerate}

    def _response(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided backprop of one batch to the model input, averaged over channels; the predicted class."""
        with torch.enable_grad(), self._relevance.attached(x) as relevance:
            with self._extractor.capturing(detach=False) as captured:
                z, logits = relevance.forward(x)
            if self._layer not in captured:
                raise ValueError(f"layer {self._layer!r} did not run in the model's forward pass")
            prediction = logits.detach().argmax(dim=1)
            if self.target == "logit":
                response = relevance.relevance(z, logits, prediction)
            else:
                activations = captured[self._layer]
                if not isinstance(activations, torch.Tensor) or activations.grad_fn is None:
                    raise ValueError(
                        f"layer {self._layer!r} output does not depend on the input; pick another layer"
                    )
                (response,) = torch.autograd.grad(activations, z, grad_outputs=activations.detach())
        return response.detach().mean(dim=1), prediction

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

    def _fitted_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        statistics = [self.clean_mean_, self.clean_std_, self.clean_degenerate_rate_]
        arrays = {"clean_statistics": np.asarray(statistics, dtype=np.float64)}
        return arrays, {"input_shape": list(self.input_shape_), "n_classes": self.n_classes_}

    def _restore(self, arrays: Mapping[str, np.ndarray], fitted: Mapping[str, Any]) -> None:
        statistics = np.asarray(arrays["clean_statistics"], dtype=np.float64)
        if statistics.shape != (3,):
            raise ValueError(f"clean_statistics must be shaped (3,); got {statistics.shape}")
        input_shape = tuple(int(size) for size in fitted["input_shape"])
        logits = self.classifier.logits(torch.zeros(1, *input_shape, device=self.classifier.device))
        self.n_classes_ = int(fitted.get("n_classes", logits.shape[1]))  # a version-2 save has none
        if logits.shape[1] != self.n_classes_:
            raise ValueError(f"the state has {self.n_classes_} classes; the model gives {logits.shape[1]}")
        self.input_shape_ = input_shape
        self.n_features_in_ = math.prod(input_shape)
        self.clean_mean_, self.clean_std_, self.clean_degenerate_rate_ = (float(v) for v in statistics)
