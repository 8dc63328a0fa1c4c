"""The LRP attack family of the thesis (seeds/004), on one iterative loop (Algorithm 2).

Each attack supplies only its adversarial pattern (a :class:`Pattern`); :func:`run_attack` does the rest
once: input checks, one forward per iteration shared by the loss-gradient and relevance backward passes,
the step, clipping to the bounds, per-sample early stop and the optional trace. Everything is batched and
stays on the caller's device; the caller's tensors and model are never modified.

Relevance always targets the original class c_a (the label when untargeted, the clean prediction when
targeted), as the thesis's algorithms do (c_t = c_a). Distances are measured in raw input units.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from zennit.canonizers import Canonizer
from zennit.core import Composite

from . import checks
from .canonize import forward_errors_named
from .checks import check_inputs, check_labels, looks_like_probabilities
from .model import Classifier
from .relevance import DEFAULT_COMPOSITE, Relevance, check_canonizers, check_composite

PROBABILITY_WARNING = (
    "the model outputs probabilities (rows >= 0 summing to 1), not logits: gradients through a softmax "
    "saturate and gradient attacks weaken; pass the model without its final softmax"
)

#: Thesis Table 4.1 (MNIST, D = 784, n_iter = 100) as fractions of the input size, so they scale with it.
DEFAULT_N_BATCH = {"flip": 5 / 784, "mean": 100 / 784, "grad": 300 / 784}
DEFAULT_MAX_ITER = 100


def _relevance_parameters(*specific: str) -> tuple[str, ...]:
    """The parameters of a relevance-driven attack, with its ``specific`` ones before ``trace``."""
    return (
        "n_batch",
        "max_iter",
        "early_stop",
        "composite",
        "targeted",
        "relevance_every",
        *specific,
        "trace",
        "canonizers",
    )


RELEVANCE_PARAMETERS = _relevance_parameters()


@dataclass(frozen=True)
class AttackConfig:
    """Validated parameters of one LRP attack; the same names in every adapter.

    eps: step per iteration in input units; None = one 8-bit level of the bounds' range, (hi - lo) / 256,
        the thesis's 2/256 on [-1, 1]. n_batch: values changed per relevance pass, a count, or a fraction
        (0, 1] of the input size. relevance_every: recompute relevance every m iterations (1 = thesis).
        canonizers: zennit canonizers for the relevance pass; None = BatchNorm merged by data flow and
        torchvision residual blocks canonized (see :mod:`xaiadv.plugins.canonize`).
    """

    eps: float | None = None
    n_batch: int | float = DEFAULT_N_BATCH["grad"]
    max_iter: int = DEFAULT_MAX_ITER
    early_stop: bool = True
    composite: str | Composite = DEFAULT_COMPOSITE
    targeted: bool = False
    relevance_every: int = 1
    momentum: float = 0.0
    flip_back: bool = False
    trace: bool = False
    seed: int = 0
    canonizers: Sequence[Canonizer] | None = None

    def __post_init__(self) -> None:
        self._as_python_numbers()
        if self.eps is not None:
            if not isinstance(self.eps, float) or not math.isfinite(self.eps):
                raise ValueError(f"eps must be a finite number > 0 or None; got {self.eps!r}")
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0; got {self.eps!r}")
        _check_n_batch(self.n_batch)
        checks.positive_int("max_iter", self.max_iter)
        checks.positive_int("relevance_every", self.relevance_every)
        for flag in ("early_stop", "targeted", "flip_back", "trace"):
            checks.boolean(flag, getattr(self, flag))
        if not isinstance(self.momentum, float) or not 0.0 <= self.momentum < math.inf:
            raise ValueError(f"momentum must be a finite number >= 0 (0 = off); got {self.momentum!r}")
        checks.integer("seed", self.seed)
        check_composite(self.composite)
        if self.canonizers is not None:
            check_canonizers(self.canonizers)
            object.__setattr__(self, "canonizers", tuple(self.canonizers))
            if isinstance(self.composite, Composite):
                raise ValueError("canonizers= applies to named composites; build your Composite with them")

    def _as_python_numbers(self) -> None:
        """numpy scalars (np.float32(0.1), np.int64(3)) become Python numbers; bools stay as they are, so
        that they are refused. A float ``n_batch`` stays a fraction and an integer one a count."""
        for name in ("eps", "momentum"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
                object.__setattr__(self, name, float(value))
        for name in ("n_batch", "max_iter", "relevance_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
                object.__setattr__(self, name, int(value))
            elif name == "n_batch" and isinstance(value, np.floating):
                object.__setattr__(self, name, float(value))

    def step_size(self, bounds: tuple[float, float]) -> float:
        """eps, or one 8-bit level of the bounds' range when eps is None."""
        return (bounds[1] - bounds[0]) / 256.0 if self.eps is None else float(self.eps)

    def batch_count(self, input_size: int) -> int:
        """n_batch as a count of input values for inputs of ``input_size`` values."""
        if isinstance(self.n_batch, float):
            return max(1, round(self.n_batch * input_size))
        if self.n_batch > input_size:
            raise ValueError(f"n_batch must be at most the input size {input_size}; got {self.n_batch}")
        return self.n_batch


def _check_n_batch(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"n_batch must be an int count or a float fraction in (0, 1]; got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"n_batch as a float is a fraction of the input size in (0, 1]; got {value!r}")
    if isinstance(value, int) and value <= 0:
        raise ValueError(f"n_batch must be > 0; got {value!r}")


@dataclass(frozen=True)
class AttackTrace:
    """Per-iteration record, rows 0..max_iter (row t = after t steps), one column per sample.

    What the thesis plots in Figs. 4.2-4.10: the original class's probability f_ca, success, and the
    L0/L1/L2/Linf norms of the perturbation. A sample stopped early keeps its last values.
    """

    original_probability: torch.Tensor
    success: torch.Tensor
    l0: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor


@dataclass(frozen=True)
class AttackResult:
    """x_adv like x; success and iterations (steps taken) per sample; the class relevance targeted."""

    x_adv: torch.Tensor
    success: torch.Tensor
    iterations: torch.Tensor
    original_class: torch.Tensor
    trace: AttackTrace | None = None


@dataclass(frozen=True)
class StepConstants:
    """What every step of one call shares: the step size, the bounds, the values changed per pass, the
    noise generator. Built once per call."""

    eps: float
    low: float
    high: float
    n_batch: int
    generator: torch.Generator


@dataclass
class StepState:
    """What a pattern sees for the samples still being attacked (all tensors hold those rows only).

    ``rows`` indexes the full-batch ``memory`` (the pattern's own): a slice while every sample is active
    (views, no copies).
    """

    x_adv: torch.Tensor
    x_orig: torch.Tensor
    gradient: torch.Tensor | None
    relevance: torch.Tensor | None
    rows: torch.Tensor | slice
    constants: StepConstants
    memory: Any

    @property
    def eps(self) -> float:
        return self.constants.eps

    @property
    def low(self) -> float:
        return self.constants.low

    @property
    def high(self) -> float:
        return self.constants.high

    @property
    def n_batch(self) -> int:
        return self.constants.n_batch


class Pattern(ABC):
    """An adversarial pattern: how x~ changes in one iteration (thesis eq. 2.31 and Algorithms 3-8).

    ``parameters`` are the AttackConfig fields the attack takes, ``defaults`` those whose default differs
    from AttackConfig's (one place for each). ``init_memory`` returns the pattern's own full-batch state
    across iterations (flip masks, momentum, channel means), or None.
    """

    name: ClassVar[str] = "pattern"
    needs_gradient: ClassVar[bool] = False
    needs_relevance: ClassVar[bool] = True
    supports_targeted: ClassVar[bool] = False
    parameters: ClassVar[tuple[str, ...]] = RELEVANCE_PARAMETERS
    defaults: ClassVar[dict[str, Any]] = {}

    def init_memory(self, x: torch.Tensor, config: AttackConfig) -> Any:
        return None

    @abstractmethod
    def step(self, state: StepState, config: AttackConfig, memory: Any) -> torch.Tensor:
        """x~ of the active samples after one step of this pattern."""

    @classmethod
    def parameter_defaults(cls) -> dict[str, Any]:
        """Every parameter of this attack with its default."""
        fields = {item.name: item.default for item in dataclasses.fields(AttackConfig)}
        return {name: cls.defaults.get(name, fields[name]) for name in cls.parameters}


def top_relevant(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` highest scores per sample (thesis eq. 3.1 for a batch of values)."""
    flat = scores.flatten(1)
    count = min(count, flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(count, dim=1, sorted=False).indices, True)
    return mask.view_as(scores)


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel mean m_k of the original image (eq. 3.2), broadcastable against x."""
    if x.dim() <= 2:
        return x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def mean_step(state: StepState, mask: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Move masked values by eps toward their channel mean (``means``, full batch), landing on it, never
    crossing it (eq. 3.2)."""
    x, target = state.x_adv, means[state.rows]
    gap = target - x
    moved = torch.where(gap.abs() <= state.eps, target.expand_as(x), x + gap.sign() * state.eps)
    return torch.where(mask, moved, x)


def sign_step(state: StepState, direction: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x + eps * sign(direction) on the masked values, clipped to the bounds (eqs. 3.3-3.5, 2.30)."""
    pattern = direction.sign()
    if mask is not None:
        pattern = pattern * mask
    return (state.x_adv + state.eps * pattern).clamp(state.low, state.high)


@dataclass(frozen=True)
class FlipMemory:
    """Which values of each sample are flipped (full batch)."""

    flipped: torch.Tensor


class FlipPattern(Pattern):
    """LRP-flip / batch-flip (Algorithms 3-5): reflect the n_batch most relevant values across the bounds'
    midpoint, x -> lo + hi - x (the thesis's sign flip on [-1, 1]).

    With ``flip_back=False`` (default) a flipped value is never selected again, which removes the looping
    the thesis reports (Figs. 3.12-3.13); with True a value may toggle back. Values are always exactly
    x or lo + hi - x of the original image. eps is unused. Untargeted only.

    With ``relevance_every=m > 1`` each iteration still flips n_batch values: without flip-back the next
    most relevant unflipped ones, so one relevance pass drives up to m * n_batch flips (the thesis, m = 1,
    has n_batch per pass); with flip-back the same values toggle, undoing each other every second step.
    """

    name = "flip"
    parameters = _relevance_parameters("flip_back")
    defaults: ClassVar[dict[str, Any]] = {"n_batch": DEFAULT_N_BATCH["flip"]}

    def init_memory(self, x: torch.Tensor, config: AttackConfig) -> FlipMemory:
        return FlipMemory(torch.zeros_like(x, dtype=torch.bool))

    def step(self, state: StepState, config: AttackConfig) -> torch.Tensor:
        flipped = state.memory.flipped[state.rows]
        scores = state.relevance
        if not config.flip_back:
            scores = scores.masked_fill(flipped, -math.inf)
        mask = top_relevant(scores, state.n_batch)
        if not config.flip_back:
            mask &= ~flipped
        flipped = flipped ^ mask
        state.memory.flipped[state.rows] = flipped
        return torch.where(flipped, state.low + state.high - state.x_orig, state.x_orig)


@dataclass(frozen=True)
class MeanMemory:
    """Each sample's per-channel means of the original image (eq. 3.2), full batch."""

    means: torch.Tensor


class MeanPattern(Pattern):
    """LRP-mean (Algorithm 6, eq. 3.2): move the n_batch most relevant values by eps toward their channel's
    mean, computed once from the original image, and never past it. Untargeted only."""

    name = "mean"
    parameters = ("eps", *RELEVANCE_PARAMETERS)
    defaults: ClassVar[dict[str, Any]] = {"n_batch": DEFAULT_N_BATCH["mean"]}

    def init_memory(self, x: torch.Tensor, config: AttackConfig) -> MeanMemory:
        return MeanMemory(channel_means(x))

    def step(self, state: StepState, config: AttackConfig) -> torch.Tensor:
        return mean_step(state, top_relevant(state.relevance, state.n_batch), state.memory.means)


@dataclass(frozen=True)
class GradMemory:
    """The momentum velocity per sample (full batch), None without momentum; the channel means where the
    pattern falls back to the mean step (grad+mean), else None."""

    velocity: torch.Tensor | None
    means: torch.Tensor | None = None


class GradPattern(Pattern):
    """LRP-grad (Algorithm 7, eqs. 3.3-3.5): the IFGSM sign-gradient step on the n_batch most relevant values.

    With n_batch = all values it is IFGSM. ``momentum`` mu > 0 accumulates L1-normalized gradients as in
    MI-FGSM (thesis 5.2.1). Follows the thesis text (most positive relevance); the thesis's public code
    also steps the most negative-relevance values, which we do not.
    """

    name = "grad"
    needs_gradient = True
    supports_targeted = True
    parameters = ("eps", *_relevance_parameters("momentum"))
    defaults: ClassVar[dict[str, Any]] = {"n_batch": DEFAULT_N_BATCH["grad"]}

    def init_memory(self, x: torch.Tensor, config: AttackConfig) -> GradMemory:
        return GradMemory(torch.zeros_like(x) if config.momentum > 0 else None)

    def direction(self, state: StepState, config: AttackConfig) -> torch.Tensor:
        """The loss gradient, or the momentum-accumulated one."""
        if state.memory.velocity is None:
            return state.gradient
        norm = state.gradient.abs().flatten(1).sum(1).clamp_min(1e-12)
        norm = norm.view(-1, *([1] * (state.gradient.dim() - 1)))
        velocity = config.momentum * state.memory.velocity[state.rows] + state.gradient / norm
        state.memory.velocity[state.rows] = velocity
        return velocity

    def step(self, state: StepState, config: AttackConfig) -> torch.Tensor:
        return sign_step(state, self.direction(state, config), top_relevant(state.relevance, state.n_batch))


class GradMeanPattern(GradPattern):
    """LRP-grad+mean (thesis 5.2.1): LRP-grad, switching to the LRP-mean pattern for each sample whose loss
    gradient is all zero (the vanishing gradients of Table 4.2). Targeted runs use the mean fallback as an
    untargeted move out of the flat region."""

    name = "grad_mean"

    def init_memory(self, x: torch.Tensor, config: AttackConfig) -> GradMemory:
        return dataclasses.replace(super().init_memory(x, config), means=channel_means(x))

    def step(self, state: StepState, config: AttackConfig) -> torch.Tensor:
        mask = top_relevant(state.relevance, state.n_batch)
        vanished = _all_zero(state.gradient)
        grad_step = sign_step(state, self.direction(state, config), mask)
        if not bool(vanished.any()):
            return grad_step
        return torch.where(vanished, mean_step(state, mask, state.memory.means), grad_step)


class NoiseIFGSMPattern(Pattern):
    """IFGSM with noise injection (Algorithm 8): where a sample's gradient is all zero, step along the sign
    of Gaussian noise instead. A reference variant; uses no relevance."""

    name = "ifgsm_noise"
    needs_gradient = True
    needs_relevance = False
    supports_targeted = True
    parameters = ("eps", "max_iter", "early_stop", "targeted", "trace", "seed")

    def step(self, state: StepState, config: AttackConfig) -> torch.Tensor:
        noise = torch.randn(state.gradient.shape, generator=state.constants.generator, device="cpu")
        noise = noise.to(device=state.gradient.device, dtype=state.gradient.dtype)
        direction = torch.where(_all_zero(state.gradient), noise, state.gradient)
        return sign_step(state, direction, None)


def _all_zero(gradient: torch.Tensor) -> torch.Tensor:
    """Per-sample mask, broadcastable against ``gradient``: True where the whole gradient is zero."""
    zero = (gradient.flatten(1) == 0).all(1)
    return zero.view(-1, *([1] * (gradient.dim() - 1)))


PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls for cls in (FlipPattern, MeanPattern, GradPattern, GradMeanPattern, NoiseIFGSMPattern)
}


class _Tracer:
    """Fills the AttackTrace rows; every sample's latest values are carried forward."""

    def __init__(self, n_rows: int, n_samples: int, device: torch.device) -> None:
        def empty() -> torch.Tensor:
            return torch.zeros(n_rows, n_samples, dtype=torch.float64, device=device)

        self.rows = {key: empty() for key in ("original_probability", "l0", "l1", "l2", "linf")}
        self.rows["success"] = torch.zeros(n_rows, n_samples, dtype=torch.bool, device=device)
        self.latest = {key: value[0].clone() for key, value in self.rows.items()}

    def update(
        self,
        samples: torch.Tensor,
        logits: torch.Tensor,
        original: torch.Tensor,
        success: torch.Tensor,
        perturbation: torch.Tensor,
    ) -> None:
        probability = logits.detach().double().softmax(1).gather(1, original.view(-1, 1)).squeeze(1)
        flat = perturbation.detach().double().flatten(1)
        values = {
            "original_probability": probability,
            "success": success,
            "l0": (flat != 0).sum(1).double(),
            "l1": flat.abs().sum(1),
            "l2": flat.norm(dim=1),
            "linf": flat.abs().amax(1) if flat.shape[1] else flat.sum(1),
        }
        for key, value in values.items():
            self.latest[key][samples] = value

    def write(self, row: int) -> None:
        for key, value in self.rows.items():
            value[row:] = self.latest[key]

    def result(self) -> AttackTrace:
        return AttackTrace(**self.rows)


def check_target_support(pattern: Pattern | type[Pattern], targeted: bool) -> None:
    """Refuse a targeted run of a pattern that cannot honour a target (flip, mean: relevance only)."""
    if targeted and not pattern.supports_targeted:
        raise ValueError(f"the {pattern.name} attack cannot honour a target; use targeted=False")


def run_attack(
    pattern: Pattern,
    model: nn.Module | Classifier,
    x: torch.Tensor,
    y: Any = None,
    *,
    bounds: tuple[float, float] | None = None,
    preprocessing: Any = None,
    config: AttackConfig | None = None,
) -> AttackResult:
    """Thesis Algorithm 2 for any pattern: per iteration, one forward, the loss gradient (hooks inactive) and
    the relevance (hooks active) from it, then x~ <- clip(pattern step), with per-sample early stop.

    model: a :class:`Classifier`, or a plain module wrapped with ``bounds`` (default (0, 1)) and
    ``preprocessing`` (mean, std) applied before it; x: raw inputs (N, ...) within the bounds; y: labels
    (targets when ``config.targeted``), None = the model's predictions (untargeted only).
    """
    config = config or AttackConfig()
    classifier = Classifier.wrap(model, bounds=bounds, preprocessing=preprocessing)
    low, high = classifier.bounds
    x = check_inputs(x, (low, high))
    check_target_support(pattern, config.targeted)
    if config.targeted and y is None:
        raise ValueError("targeted attacks need y: the target class of each sample")
    if y is not None:  # all but the class count, which the first forward tells
        check_labels(y, x.shape[0], None, x.device)
    input_size = x[0].numel() if x.shape[0] else math.prod(x.shape[1:])
    n_batch = config.batch_count(input_size)
    # Selecting every value needs no ranking: n_batch = all leaves relevance zero and its pass unrun
    # (LRP-grad is then IFGSM at IFGSM's cost).
    uses_relevance = pattern.needs_relevance and n_batch < input_size
    composite = config.composite if uses_relevance else Composite()  # no hooks, no BatchNorm merge
    canonizers = config.canonizers if uses_relevance else None
    relevance = Relevance(classifier, composite, canonizers=canonizers)
    if x.shape[0] == 0:
        return _empty_result(x, config)
    x_orig = x.detach().clamp(low, high)  # a copy; absorbs the rounding check_inputs tolerates
    constants = StepConstants(
        eps=config.step_size((low, high)),
        low=low,
        high=high,
        n_batch=n_batch,
        generator=torch.Generator().manual_seed(config.seed),
    )
    with relevance.attached(x_orig):
        return _iterate(_Call(pattern, relevance, config, constants, uses_relevance), x_orig, y)


def _clean_forward(relevance: Relevance, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hooked forward of the clean batch, (z, logits), which is also the first iteration's forward.

    A model error becomes a ValueError naming x's shape, dtype and device; softmax outputs are warned
    about: a gradient through a saturated softmax vanishes, which weakens every gradient-based attack.
    """
    with forward_errors_named(x):
        z, logits = relevance.forward(x)
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits shaped (N, classes); got {tuple(logits.shape)}")
    if looks_like_probabilities(logits.detach()):
        warnings.warn(PROBABILITY_WARNING, UserWarning, stacklevel=5)
    return z, logits


@dataclass(frozen=True)
class _Call:
    """What one attack call holds fixed across its iterations."""

    pattern: Pattern
    relevance: Relevance
    config: AttackConfig
    constants: StepConstants
    uses_relevance: bool

    def gradient(
        self, z: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, *, retain: bool
    ) -> torch.Tensor:
        """Input gradient of the summed cross-entropy (its negative when targeted, to descend toward the
        target): per-sample steps do not shrink with the batch size, as ART's and IFGSM's."""
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        return self.relevance.gradient(z, -loss if self.config.targeted else loss, retain_graph=retain)


class _Progress:
    """Per-sample bookkeeping: which samples are still attacked, which succeeded, after how many steps."""

    def __init__(self, n_samples: int, max_iter: int, device: torch.device) -> None:
        self.running = torch.ones(n_samples, dtype=torch.bool, device=device)
        self.succeeded = torch.zeros(n_samples, dtype=torch.bool, device=device)
        self.iterations = torch.full((n_samples,), max_iter, dtype=torch.long, device=device)

    def active(self) -> torch.Tensor | slice:
        """Index of the samples still attacked: a slice (views, no copies) while all are, else indices."""
        if bool(self.running.all()):
            return slice(None)
        return self.running.nonzero().squeeze(1)

    def finish(self, rows: torch.Tensor | slice, success: torch.Tensor, iteration: int) -> None:
        """Samples ``rows[success]`` succeeded after ``iteration`` steps and leave the attack."""
        finished = torch.arange(len(self.running), device=self.running.device)[rows][success]
        self.succeeded[finished], self.running[finished], self.iterations[finished] = True, False, iteration


def _iterate(call: _Call, x_orig: torch.Tensor, y: Any) -> AttackResult:
    """Algorithm 2's loop. Iteration 0 runs on the clean batch's forward, which also gives the class count,
    the predictions and so the labels: the clean batch is not run through the model twice. Without
    ``uses_relevance`` the relevance stays zero, so every value ties and ``top_relevant`` selects all n_batch
    (= all) of them."""
    pattern, config, relevance = call.pattern, call.config, call.relevance
    z, logits = _clean_forward(relevance, x_orig)
    prediction = logits.detach().argmax(1)
    labels = prediction if y is None else check_labels(y, len(x_orig), logits.shape[1], x_orig.device)
    original = prediction if config.targeted else labels
    x_adv = x_orig.clone()
    progress = _Progress(len(x_orig), config.max_iter, x_orig.device)
    memory = pattern.init_memory(x_orig, config)
    stored_relevance = torch.zeros_like(x_orig) if pattern.needs_relevance else None
    tracer = _Tracer(config.max_iter + 1, len(x_orig), x_orig.device) if config.trace else None
    for iteration in range(config.max_iter):
        rows = progress.active()
        if iteration:
            z, logits = relevance.forward(x_adv[rows])
        success = _is_success(logits.detach(), labels[rows], config.targeted)
        if tracer is not None:
            tracer.update(rows, logits, original[rows], success, x_adv[rows] - x_orig[rows])
            tracer.write(iteration)
        keep: torch.Tensor | slice = slice(None)
        if config.early_stop and bool(success.any()):
            progress.finish(rows, success, iteration)
            if bool(success.all()):
                break
            keep = ~success
        needs_relevance = call.uses_relevance and iteration % config.relevance_every == 0
        gradient = None
        if pattern.needs_gradient:
            gradient = call.gradient(z, logits[keep], labels[rows][keep], retain=needs_relevance)
            gradient = gradient.to(x_orig.dtype)[keep]
        if needs_relevance:
            stored_relevance[rows] = relevance.relevance(z, logits, original[rows]).to(x_orig.dtype)
        del z, logits
        step_rows = rows if isinstance(keep, slice) else progress.active()
        state = StepState(
            x_adv=x_adv[step_rows],
            x_orig=x_orig[step_rows],
            gradient=gradient,
            relevance=None if stored_relevance is None else stored_relevance[step_rows],
            rows=step_rows,
            constants=call.constants,
            memory=memory,
        )
        x_adv[step_rows] = pattern.step(state, config).detach()
    return _result(call, x_adv, x_orig, labels, original, progress, tracer)


def _result(
    call: _Call,
    x_adv: torch.Tensor,
    x_orig: torch.Tensor,
    labels: torch.Tensor,
    original: torch.Tensor,
    progress: _Progress,
    tracer: _Tracer | None,
) -> AttackResult:
    """The final forward's success (or the early stop's), and the trace's last row."""
    relevance, config = call.relevance, call.config
    with torch.no_grad():
        final_logits = relevance.classifier.logits(x_adv)
    final_success = _is_success(final_logits, labels, config.targeted)
    if config.early_stop:
        final_success |= progress.succeeded
    if tracer is not None:
        running = progress.running
        tracer.update(
            progress.active(),
            final_logits[running],
            original[running],
            final_success[running],
            (x_adv - x_orig)[running],
        )
        tracer.write(config.max_iter)
    return AttackResult(
        x_adv=x_adv.detach(),
        success=final_success,
        iterations=progress.iterations,
        original_class=original,
        trace=tracer.result() if tracer is not None else None,
    )


def _is_success(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    prediction = logits.argmax(1)
    return prediction == labels if targeted else prediction != labels


def _empty_result(x: torch.Tensor, config: AttackConfig) -> AttackResult:
    empty_long = torch.zeros(0, dtype=torch.long, device=x.device)
    trace = None
    if config.trace:
        rows = config.max_iter + 1
        zeros = torch.zeros(rows, 0, dtype=torch.float64, device=x.device)
        trace = AttackTrace(zeros, zeros.bool(), zeros, zeros, zeros, zeros)
    return AttackResult(x.detach().clone(), empty_long.bool(), empty_long, empty_long, trace)


AttackFn = Callable[..., AttackResult]


def _functional(pattern_name: str, defaults: dict[str, Any]) -> AttackFn:
    """The functional form of one attack: ``fn(model, x, y=None, *, bounds, preprocessing, **params)``."""
    pattern_cls = PATTERNS[pattern_name]

    def attack(
        model: nn.Module | Classifier,
        x: torch.Tensor,
        y: Any = None,
        *,
        bounds: tuple[float, float] | None = None,
        preprocessing: Any = None,
        **params: Any,
    ) -> AttackResult:
        config = make_config(pattern_name, **params)
        return run_attack(
            pattern_cls(), model, x, y, bounds=bounds, preprocessing=preprocessing, config=config
        )

    attack.__name__ = attack.__qualname__ = (
        f"lrp_{pattern_name}" if pattern_name != "ifgsm_noise" else pattern_name
    )
    attack.__doc__ = (pattern_cls.__doc__ or "") + f"\n\n    Defaults: {defaults}. Returns an AttackResult."
    return attack


#: Parameters each attack accepts, with its defaults (thesis Table 4.1, MNIST row), from the patterns.
ATTACK_PARAMS: dict[str, dict[str, Any]] = {name: cls.parameter_defaults() for name, cls in PATTERNS.items()}


def make_config(pattern_name: str, **params: Any) -> AttackConfig:
    """The AttackConfig of one attack from keyword parameters; an unknown keyword is a clear error."""
    pattern = PATTERNS[pattern_name]
    unknown = sorted(set(params) - set(pattern.parameters))
    if unknown:
        raise TypeError(
            f"unknown parameter(s) {unknown} for the {pattern_name} attack; "
            f"valid: {sorted(pattern.parameters)}"
        )
    config = AttackConfig(**{**pattern.defaults, **params})
    check_target_support(PATTERNS[pattern_name], config.targeted)
    return config


lrp_flip = _functional("flip", ATTACK_PARAMS["flip"])
lrp_mean = _functional("mean", ATTACK_PARAMS["mean"])
lrp_grad = _functional("grad", ATTACK_PARAMS["grad"])
lrp_grad_mean = _functional("grad_mean", ATTACK_PARAMS["grad_mean"])
ifgsm_noise = _functional("ifgsm_noise", ATTACK_PARAMS["ifgsm_noise"])
