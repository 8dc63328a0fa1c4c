"""Detector-aware PGD: misclassify and stay below the detector's own threshold (Carlini & Wagner 2017).

A detector figure measured against attacks that ignore the detector overstates it (Carlini & Wagner 2017,
"Adversarial examples are not easily detected"; Tramer et al. 2020). The adaptive attack minimizes, per
sample, the sum of C&W's misclassification margin and the detector's score relative to its threshold:

    L(x') = max(z_y - max_{j != y} z_j, -kappa) + c * max(s(x') - t + delta, 0)

(seed 002 eq. 6 is this form for I-defender, with s the negative log-likelihood under the most promising
other class's mixture). z are the logits, s the detector's differentiable score (higher = more
adversarial), t its threshold, delta a small margin below it. The weight c is searched per sample as in
C&W: a sample that stays flagged gets a larger c, one that stays correctly classified a smaller one (x10 or
/10 until bounded, then the geometric mean of the bounds). Each search step runs projected gradient descent
from the clean input in an L-inf or L2 ball, within the bounds, and stops a sample at its first bypass
(misclassified and not flagged); the last search step's iterate is kept for a sample that never bypassed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from . import checks
from .checks import check_inputs, check_labels
from .model import Classifier

NORMS = (math.inf, 2.0)
#: Score units pushed past the threshold for a detector that splits ties at it by a second score (the
#: kNN's): a sample tied with the threshold may be flagged, so only a score strictly below counts as accepted.
_TIE_SLACK = 1e-9


@runtime_checkable
class DifferentiableDetector(Protocol):
    """What the adaptive attack needs of a fitted detector: a score it can differentiate in raw inputs,
    and the threshold above which the detector flags: a number, or one per class (n_classes,), compared
    with the score of a sample predicted as that class (I-defender's eq. 5)."""

    threshold_: float | torch.Tensor | np.ndarray

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        """One score per sample of raw ``x`` (N,), differentiable in x."""
        ...


@dataclass(frozen=True)
class AdaptiveConfig:
    """Budget and schedule of the detector-aware attack; validated on construction.

    norm: ``math.inf`` (L-inf) or 2.0 (L2); eps: the ball's radius in input units; eps_step: the step per
    iteration (the sign step for L-inf, the normalized-gradient step for L2); max_iter: PGD steps per search
    step; search_steps: how many weights c each sample tries; initial_weight: its first c; kappa: how far
    past the decision boundary the margin is still rewarded; delta: how far below the threshold the score
    is pushed (in score units).
    """

    norm: float = math.inf
    eps: float = 0.3
    eps_step: float = 0.01
    max_iter: int = 100
    search_steps: int = 5
    initial_weight: float = 1.0
    kappa: float = 0.0
    delta: float = 0.0

    def __post_init__(self) -> None:
        checks.one_of("norm", self.norm, NORMS)
        for name in ("eps", "eps_step", "initial_weight"):
            checks.finite_number(name, getattr(self, name), low=0.0, low_open=True)
        for name in ("kappa", "delta"):
            checks.finite_number(name, getattr(self, name), low=0.0)
        checks.positive_int("max_iter", self.max_iter)
        checks.positive_int("search_steps", self.search_steps)


@dataclass(frozen=True)
class AdaptiveResult:
    """Adversarial inputs, and per sample: misclassified, flagged, bypassed (both goals), the weight used."""

    x_adv: torch.Tensor
    misclassified: torch.Tensor
    flagged: torch.Tensor
    bypassed: torch.Tensor
    weight: torch.Tensor


def detector_aware_pgd(
    model: nn.Module | Classifier,
    detector: DifferentiableDetector,
    x: torch.Tensor,
    y: object,
    *,
    config: AdaptiveConfig | None = None,
) -> AdaptiveResult:
    """Detector-aware PGD on raw ``x`` with true labels ``y`` (untargeted); see the module docstring."""
    config = config or AdaptiveConfig()
    classifier = Classifier.wrap(model)
    if not isinstance(detector, DifferentiableDetector):
        raise TypeError(
            f"detector must offer score_torch(x) and threshold_ (a fitted detector of ours); got "
            f"{type(detector).__name__}"
        )
    x = check_inputs(x, classifier.bounds)
    labels = check_labels(y, x.shape[0], None, x.device)
    x_orig = x.detach().clamp(*classifier.bounds)
    weight = torch.full((len(x),), config.initial_weight, dtype=torch.float64, device=x.device)
    search = _WeightSearch(weight)
    best = x_orig.clone()
    with classifier.evaluating():
        for _ in range(config.search_steps):
            rows = (~search.bypassed).nonzero().squeeze(1)  # a bypass found is kept; the rest search on
            best[rows] = _pgd(classifier, detector, x_orig[rows], labels[rows], search.weight[rows], config)
            misclassified, flagged = _judge(classifier, detector, best, labels)
            search.update(misclassified, flagged)
            if bool(search.bypassed.all()):
                break
    return AdaptiveResult(best, misclassified, flagged, misclassified & ~flagged, search.used)


def _pgd(
    classifier: Classifier,
    detector: DifferentiableDetector,
    x_orig: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    config: AdaptiveConfig,
) -> torch.Tensor:
    """Projected gradient descent on L(x') from x_orig; a sample stops at its first bypass."""
    low, high = classifier.bounds
    x_adv = x_orig.clone()
    running = torch.ones(len(x_orig), dtype=torch.bool, device=x_orig.device)
    for _ in range(config.max_iter):
        rows = running.nonzero().squeeze(1)
        gradient, done = loss_gradient(classifier, detector, x_adv[rows], labels[rows], weight[rows], config)
        with torch.no_grad():
            step = _step(gradient.to(x_adv.dtype), config)
            moved = _project(x_adv[rows] - step, x_orig[rows], config).clamp(low, high)
            x_adv[rows] = torch.where(_per_sample(done, moved), x_adv[rows], moved)
            running[rows[done]] = False
        if not bool(running.any()):
            break
    return x_adv.detach()


def loss_gradient(
    classifier: Classifier,
    detector: DifferentiableDetector,
    x_adv: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    config: AdaptiveConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration's work: the gradient of L(x') (module docstring) in ``x_adv`` (N, ...), and which
    samples already bypass (N,) bool. What ``xaiadv bench`` times against an IFGSM step."""
    z = x_adv.detach().requires_grad_(True)
    logits = classifier.logits(z)
    score = detector.score_torch(z)
    threshold = thresholds(detector, logits.detach().argmax(1)).to(score.dtype)
    margin = _margin(logits, labels).clamp(min=-config.kappa)
    splits_ties = getattr(detector, "tie_break_threshold_", None) is not None
    excess = (score - threshold + config.delta + (_TIE_SLACK if splits_ties else 0.0)).clamp(min=0.0)
    loss = (margin + weight.to(margin.dtype) * excess).sum()
    (gradient,) = torch.autograd.grad(loss, z)
    accepted = score.detach() < threshold if splits_ties else score.detach() <= threshold
    done = (logits.detach().argmax(1) != labels) & accepted
    return gradient, done


def pgd(model: nn.Module | Classifier, x: torch.Tensor, y: object, *, config: AdaptiveConfig) -> torch.Tensor:
    """The non-adaptive reference: PGD on the cross-entropy (Madry et al. 2018) in the same ball, with the
    same step and iteration count as :func:`detector_aware_pgd`, blind to any detector and without early
    stop (``search_steps``, ``kappa`` and ``delta`` unused). Raw ``x`` (N, ...) and true labels ``y``."""
    classifier = Classifier.wrap(model)
    x = check_inputs(x, classifier.bounds)
    labels = check_labels(y, x.shape[0], None, x.device)
    x_orig = x.detach().clamp(*classifier.bounds)
    x_adv = x_orig.clone()
    with classifier.evaluating():
        for _ in range(config.max_iter):
            z = x_adv.requires_grad_(True)
            loss = nn.functional.cross_entropy(classifier.logits(z), labels, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, z)
            with torch.no_grad():  # ascent on the loss: descent on its negative
                x_adv = _project(x_adv + _step(gradient, config), x_orig, config).clamp(*classifier.bounds)
    return x_adv.detach()


def vanishing_gradient_share(detector: DifferentiableDetector, x: torch.Tensor) -> float:
    """The share of samples of ``x`` whose detector-score gradient is all zero or not finite: where that is
    most of them, an adaptive attack has nothing to follow and its figure says little (Carlini et al. 2019,
    section 5; Athalye et al. 2018)."""
    z = x.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(detector.score_torch(z).sum(), z, allow_unused=True)
    if gradient is None:
        return 1.0
    flat = gradient.flatten(1)
    vanished = (flat == 0).all(1) | ~torch.isfinite(flat).all(1)
    return float(vanished.double().mean())


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C&W's f6 margin: the true logit minus the largest other (< 0 once misclassified)."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), -math.inf)
    return true - others.max(1).values


def _step(gradient: torch.Tensor, config: AdaptiveConfig) -> torch.Tensor:
    if config.norm == math.inf:
        return config.eps_step * gradient.sign()
    norms = gradient.flatten(1).norm(dim=1).clamp(min=1e-12)
    return config.eps_step * gradient / _per_sample(norms, gradient)


def _project(x_adv: torch.Tensor, x_orig: torch.Tensor, config: AdaptiveConfig) -> torch.Tensor:
    delta = x_adv - x_orig
    if config.norm == math.inf:
        return x_orig + delta.clamp(-config.eps, config.eps)
    norms = delta.flatten(1).norm(dim=1)
    factor = (config.eps / norms.clamp(min=1e-12)).clamp(max=1.0)
    return x_orig + delta * _per_sample(factor, delta)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (N,) shaped to broadcast over a batch like ``like`` (N, ...)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def thresholds(detector: DifferentiableDetector, predicted: torch.Tensor) -> torch.Tensor:
    """Each sample's threshold (N,) float64: the detector's one, or its predicted class's."""
    value = torch.as_tensor(detector.threshold_, dtype=torch.float64, device=predicted.device)
    return value[predicted] if value.dim() == 1 else value.expand(predicted.shape)


def _judge(
    classifier: Classifier, detector: DifferentiableDetector, x_adv: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(misclassified, flagged) of each sample, by the model and the detector's own decision: its
    ``detect`` where it has one (with any tie-break), else score > threshold."""
    with torch.no_grad():
        logits = classifier.logits(x_adv)
        misclassified = logits.argmax(1) != labels
        detect = getattr(detector, "detect", None)
        if callable(detect):
            flagged = torch.as_tensor(detect(x_adv), device=x_adv.device).bool()
        else:
            with torch.enable_grad():  # a score may need autograd inside; no graph is kept
                score = detector.score_torch(x_adv).detach()
            flagged = score > thresholds(detector, logits.argmax(1)).to(score.dtype)
    return misclassified, flagged


class _WeightSearch:
    """C&W's search over the trade-off weight per sample, in both directions."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.used = weight.clone()
        self.lower = torch.zeros_like(weight)
        self.upper = torch.full_like(weight, math.inf)
        self.bypassed = torch.zeros(len(weight), dtype=torch.bool, device=weight.device)

    def update(self, misclassified: torch.Tensor, flagged: torch.Tensor) -> None:
        """Flagged: more weight on the detector; correctly classified but accepted: less; bypassed: keep."""
        self.used = torch.where(self.bypassed, self.used, self.weight)
        self.bypassed |= misclassified & ~flagged
        raise_weight = ~self.bypassed & flagged
        lower_weight = ~self.bypassed & ~flagged & ~misclassified
        self.lower[raise_weight] = self.weight[raise_weight]
        self.upper[lower_weight] = self.weight[lower_weight]
        bounded = torch.isfinite(self.upper) & (self.lower > 0)
        geometric = (self.lower.clamp(min=1e-12) * self.upper.clamp(max=1e12)).sqrt()
        proposal = torch.where(
            bounded, geometric, torch.where(raise_weight, self.weight * 10, self.weight / 10)
        )
        self.weight = torch.where(self.bypassed, self.weight, proposal)


def differentiable_detector(detector: object) -> DifferentiableDetector:
    """The object with ``score_torch`` and ``threshold_``: the detector itself, or the plugin an ART
    detector of ours wraps (``plugin_``); refused with what is missing otherwise, also when its score has
    no gradient (``score_torch`` raises NotImplementedError on a probe, as spatial entropy's does)."""
    for candidate in (detector, getattr(detector, "plugin_", None)):
        if isinstance(candidate, DifferentiableDetector) and _fitted_threshold(candidate):
            _check_differentiable(candidate)
            return candidate
    raise TypeError(
        f"detector: a fitted detector with a differentiable score_torch(x) and a threshold_ is needed; got "
        f"{type(detector).__name__} (fit and calibrate it first, or give a detector whose score is "
        "differentiable)"
    )


def _fitted_threshold(detector: DifferentiableDetector) -> bool:
    try:
        threshold = np.asarray(getattr(detector, "threshold_", None), dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return threshold.ndim <= 1 and threshold.size > 0 and bool(np.isfinite(threshold).all())


def _check_differentiable(detector: DifferentiableDetector) -> None:
    shape = getattr(detector, "input_shape_", None)
    if shape is None:
        return  # a user's detector: its first call will say
    model = getattr(detector, "model", None)
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    try:
        detector.score_torch(torch.zeros((1, *shape), device=device))
    except NotImplementedError as error:
        raise TypeError(f"detector: {error}; a detector-aware attack needs a differentiable score") from error


def check_same_model(detector: object, model: torch.nn.Module) -> None:
    """Refuse a detector that reads another model than the classifier's (when it says which it reads)."""
    own = getattr(detector, "classifier", None) or getattr(detector, "model", None)
    own_module = getattr(own, "module", getattr(own, "model", own))
    if isinstance(own_module, torch.nn.Module) and own_module is not model:
        raise ValueError(
            "detector: it was fitted on another model than the classifier's; an adaptive attack must "
            "attack the model the detector protects (use the same torch module)"
        )
