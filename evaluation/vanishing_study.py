"""Vanishing gradients (thesis 4.2.4, Table 4.2, Algorithm 8; LRP-mean of 3.2): the library and its study.

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

Which saturated model: both, as two columns beside the logit model (:data:`MODELS`). ``softmax`` hands the
attacks the probabilities (what a PyTorch user gets from a model with its softmax inside; the attacks warn).
``clipped`` hands them ``log(clip(softmax, 1e-7, 1 - 1e-7))`` (:class:`ClippedLogSoftmax`), so that their
cross-entropy is Keras's ``categorical_crossentropy``, the loss behind the thesis's 60.9%. Why both: in
float32 the softmax alone barely saturates more than the logit model (at the first iteration not at all for
correct samples: the same condition, a margin over ~104 / logit_scale), which is the thesis's own finding
that separating the softmax "did not lead to immediate improved results"; the clip is what makes the
gradient vanish at a margin of ~16 (measured on Fashion-MNIST's reference CNN at logit scale 1: 2.3% with
the clip, 0% without; at scale 4: 57.5% and 0%). Along IFGSM the two differ again: a sample pushed past
its class saturates on the wrong class with the softmax inside (its Jacobian is zero there too) or with
the clip (p_y clipped at 1e-7), not on the logit model, whose p - onehot(y) keeps its -1.

:func:`zero_gradient_trace` and :func:`attack_success` are the typed library functions;
:class:`VanishingGradientStudy` (``xaiadv:VanishingGradientStudy``) runs them as resumable cells on the
run's model: per model, one ``vanishing`` cell (the zero share at the first iteration and along IFGSM) and
one ``vanishing_attack`` cell per attack (its ASR, with the ASR among the all-zero samples and the others).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from zennit.composites import LayerMapComposite, MixedComposite
from zennit.core import Composite
from zennit.rules import Pass

from xaiadv.plugins import checks
from xaiadv.plugins.relevance import DEFAULT_COMPOSITE, build_composite, check_composite

from .studies import Study, studies

if TYPE_CHECKING:
    from .config import RunConfig
    from .run import Run
    from .rundir import RunDirectory

#: Keras's backend epsilon: ``categorical_crossentropy`` clips probabilities to [1e-7, 1 - 1e-7].
KERAS_EPSILON = 1e-7


class ClippedLogSoftmax(nn.Module):
    """``log(clip(softmax(z), clip, 1 - clip))`` over classes (dim 1): Keras's ``categorical_crossentropy``
    on a softmax output, as log-probabilities, so that ``cross_entropy(outputs, y)`` is Keras's loss up to
    ``log(sum_j clip(p_j))`` (at most ``log(1 + K * clip)``, under 1e-6 for 10 classes at Keras's 1e-7).

    A module, not a function in a forward, so that relevance can pass it (:func:`softmax_pass_composite`).
    """

    def __init__(self, clip: float = KERAS_EPSILON) -> None:
        super().__init__()
        self.clip = checks.finite_number("clip", clip, low=0.0, low_open=True)
        if self.clip >= 0.5:
            raise ValueError(
                f"clip must be < 0.5 (probabilities are clipped to [clip, 1 - clip]); got {clip!r}"
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.softmax(1).clamp(self.clip, 1.0 - self.clip).log()


class SoftmaxOutput(nn.Module):
    """``softmax(logit_scale * model(x))`` over classes (dim 1), or ``logit_scale * model(x)`` without the
    softmax; with ``clip``, Keras's clipped log-probabilities of that softmax (:class:`ClippedLogSoftmax`).
    The caller's model is held, never changed; eval/train reach it as for any submodule."""

    def __init__(
        self, model: nn.Module, logit_scale: float = 1.0, *, softmax: bool = True, clip: float | None = None
    ) -> None:
        super().__init__()
        self.model = checks.module("model", model)
        self.logit_scale = checks.finite_number("logit_scale", logit_scale, low=0.0, low_open=True)
        if clip is not None and not checks.boolean("softmax", softmax):
            raise ValueError("clip: Keras clips the softmax's probabilities; give softmax=True with it")
        if clip is not None:
            self.softmax: nn.Module = ClippedLogSoftmax(clip)
        else:
            self.softmax = nn.Softmax(dim=1) if checks.boolean("softmax", softmax) else nn.Identity()
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.model(x) * self.logit_scale)


def input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """The input gradient (like x) of the attacks' loss, ``cross_entropy(model(x), y)`` summed (what our
    attacks and ART's IFGSM differentiate, eq. 2.30), on ``model``'s outputs as they are: the
    probabilities of a :class:`SoftmaxOutput`. x: (N, ...) float inputs; y: (N,) class indices. The model
    is used in eval mode and restored."""
    x = checks.check_batch(x)
    y = checks.check_labels(y, x.shape[0], None, x.device)
    checks.positive_int("batch_size", batch_size)
    was_training = model.training
    gradients = []
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            rows = x[start : start + batch_size].detach().clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(rows), y[start : start + batch_size], reduction="sum")
            gradients.append(torch.autograd.grad(loss, rows)[0])
    finally:
        model.train(was_training)
    return torch.cat(gradients) if gradients else torch.zeros_like(x)


def zero_gradient_mask(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """Per sample (N,) bool: is every entry of the input gradient of the attacks' loss
    (:func:`input_gradient`) exactly zero?"""
    return (input_gradient(model, x, y, batch_size=batch_size).flatten(1) == 0).all(1)


def softmax_pass_composite(
    composite: str = DEFAULT_COMPOSITE, *, sample: torch.Tensor, bounds: tuple[float, float] = (0.0, 1.0)
) -> Composite:
    """A fresh zennit Composite: ``composite``'s rules, with relevance passing every ``nn.Softmax`` and
    :class:`ClippedLogSoftmax` unchanged.

    So the relevance of a :class:`SoftmaxOutput` equals that of the same network without the softmax (the
    thesis's layer-wise LRP); ``sample`` (1, ...) sets the box of ``epsilon_gamma_box``. No canonizers: the
    reference CNN has no BatchNorm (a model with one is refused by the relevance pass, naming the layers).
    """
    check_composite(composite)
    if isinstance(composite, Composite):
        raise ValueError("composite: give a composite name; a Composite instance is used as it is")
    low, high = checks.check_bounds(bounds)
    box = (torch.full_like(sample[:1], low), torch.full_like(sample[:1], high))
    return MixedComposite(
        [LayerMapComposite([((nn.Softmax, ClippedLogSoftmax), Pass())]), build_composite(composite, [], box)]
    )


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


# -------------------------------------------------------------------------------------------------
# the trace of zero gradients along IFGSM, and the attacks' ASR on each model


#: IFGSM by registry name: LRP-grad on every value (equal to ART's BIM iterate by iterate, tests/plugins).
IFGSM = ("xaiadv:LRPGrad", {"n_batch": 1.0})


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Collect the warnings raised inside (each message once, in order) into the yielded list, then issue
    each once again: recorded for the results, not silenced."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    categories: dict[str, type[Warning]] = {}
    for warning in caught:
        categories.setdefault(str(warning.message), warning.category)
    messages.extend(categories)
    for message, category in categories.items():
        warnings.warn(message, category, stacklevel=3)


def zero_gradient_trace(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 1 / 256,
    max_iter: int = 100,
    batch_size: int = 256,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """(max_iter + 1, N) bool: row t marks the samples whose gradient is all zero (:func:`zero_gradient_mask`)
    at IFGSM's t-th iterate (row 0: the clean input, Table 4.2's number; row max_iter: the last iterate).

    IFGSM (eq. 2.30 iterated, no projection, as registry ``xaiadv:LRPGrad`` with ``n_batch = 1.0``):
    x <- clip(x + eps * sign(gradient)), early stop off, so a sample keeps moving after it is misclassified
    and its gradient is followed to the end; a sample with an all-zero gradient does not move (sign(0) = 0).
    Each row's one gradient gives both its mask and the step (the tests check the iterates against the
    attack's); y: (N,) true labels.
    """
    checks.positive_int("max_iter", max_iter)
    checks.finite_number("eps", eps, low=0.0, low_open=True)
    low, high = checks.check_bounds(bounds)
    x_adv = checks.check_batch(x).detach().clone()
    rows = []
    for _ in range(max_iter):
        gradient = input_gradient(model, x_adv, y, batch_size=batch_size)
        rows.append((gradient.flatten(1) == 0).all(1))
        x_adv = (x_adv + eps * gradient.sign()).clamp(low, high)
    rows.append(zero_gradient_mask(model, x_adv, y, batch_size=batch_size))
    return torch.stack(rows)


@dataclass(frozen=True)
class VanishingAttack:
    """One attack of the study: a label, an ``xaiadv:`` registry name and its own parameters (the study sets
    ``eps`` and ``max_iter`` for all, and the composite of the relevance attacks)."""

    label: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pattern(self) -> str:
        """The plugin pattern the registry name runs."""
        from xaiadv.bridge.registry import XAIADV_ATTACKS

        return XAIADV_ATTACKS[self.name.partition(":")[2]]

    @classmethod
    def of(cls, key: str, value: object) -> VanishingAttack:
        """An attack from a registry name (its own label) or a ``{ name, label, params }`` table; a
        ValueError naming ``key``."""
        from xaiadv.bridge.registry import DETECTOR_AWARE, XAIADV_ATTACKS

        if isinstance(value, VanishingAttack):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{key}: expected a registry name or a table {{ name, label, params }}, got {value!r}"
            )
        unknown = sorted(set(value) - {"name", "label", "params"})
        if unknown:
            raise ValueError(f"{key}: unknown keys {unknown}; valid: name, label, params")
        name, params = value.get("name"), value.get("params", {})
        ours = [f"xaiadv:{attack}" for attack in XAIADV_ATTACKS]
        if name not in ours:
            raise ValueError(
                f"{key}.name: expected one of our attacks ({', '.join(ours)}; {DETECTOR_AWARE} needs a "
                f"detector), got {name!r}"
            )
        label = value.get("label", name)
        if not isinstance(label, str) or not label:
            raise ValueError(f"{key}.label: expected a non-empty string, got {label!r}")
        if not isinstance(params, Mapping):
            raise ValueError(f"{key}.params: expected a table of the attack's parameters, got {params!r}")
        set_here = sorted({"eps", "max_iter", "composite"} & set(params))
        if set_here:
            raise ValueError(f"{key}.params: {set_here} are the study's own parameters; set them there")
        return cls(label, name, dict(params))


#: Thesis Table 4.2's attacks: IFGSM, IFGSM + noise (Algorithm 8), LRP-mean (Algorithm 6), and LRP-grad+mean
#: (5.2.1, LRP-grad falling back to LRP-mean where the gradient vanishes), each with its Table 4.1 n_batch.
DEFAULT_ATTACKS = (
    VanishingAttack("IFGSM", IFGSM[0], IFGSM[1]),
    VanishingAttack("IFGSM+noise", "xaiadv:IFGSMNoise"),
    VanishingAttack("LRP-mean", "xaiadv:LRPMean"),
    VanishingAttack("LRP-grad+mean", "xaiadv:LRPGradMean"),
)
#: The models the study compares (columns of its table): the network with its softmax inside (PyTorch's
#: cross-entropy over its probabilities), the same with Keras's clipped loss, and the logit model.
MODELS = ("softmax", "clipped", "logits")


def study_model(model: nn.Module, variant: str, *, logit_scale: float, clip: float) -> SoftmaxOutput:
    """One of :data:`MODELS` built on ``model`` (held, not changed) at ``logit_scale``."""
    checks.one_of("variant", variant, MODELS)
    if variant == "clipped":
        return SoftmaxOutput(model, logit_scale, clip=clip)
    return SoftmaxOutput(model, logit_scale, softmax=variant == "softmax")


def attack_success(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: VanishingAttack,
    *,
    eps: float = 1 / 256,
    max_iter: int = 100,
    composite: str = DEFAULT_COMPOSITE,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """(N,) bool: which samples ``attack`` fools on ``model`` (untargeted, labels ``y``, per-sample early
    stop), in mini-batches; the relevance attacks' composite passes the softmax
    (:func:`softmax_pass_composite`), so that they see the thesis's layer-wise relevance on every model.
    IFGSM + noise draws from ``seed``."""
    from xaiadv.bridge.registry import build_attack
    from xaiadv.plugins.attacks import PATTERNS

    params: dict[str, Any] = {**attack.params, "eps": eps, "max_iter": max_iter}
    if PATTERNS[attack.pattern].needs_relevance:
        params["composite"] = softmax_pass_composite(composite, sample=x[:1])
    if "seed" in PATTERNS[attack.pattern].parameters:
        params.setdefault("seed", seed)
    built = build_attack(attack.name, model=model, **params)
    success = []
    for start in range(0, len(x), batch_size):
        built(x[start : start + batch_size], y[start : start + batch_size])
        success.append(built.last_result.success.detach().cpu())
    return torch.cat(success) if success else torch.zeros(0, dtype=torch.bool)


# -------------------------------------------------------------------------------------------------
# the study


def _attacks(value: object) -> tuple[VanishingAttack, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"attacks: expected a non-empty list of registry names or tables, got {value!r}")
    attacks = tuple(VanishingAttack.of(f"attacks[{index}]", entry) for index, entry in enumerate(value))
    labels = [attack.label for attack in attacks]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"attacks: labels must be unique; repeated: {repeated}")
    return attacks


def _models(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"models: expected a non-empty list of {', '.join(MODELS)}; got {value!r}")
    unknown = [v for v in value if v not in MODELS]
    if unknown or len(set(value)) != len(value):
        raise ValueError(f"models: each of {', '.join(MODELS)} at most once; got {list(value)}")
    return tuple(value)


@studies.register("xaiadv:VanishingGradientStudy")
@dataclass(frozen=True)
class VanishingGradientStudy(Study):
    """Thesis Table 4.2 on the run's model made to saturate: per model of ``models`` (the softmax model,
    Keras's clipped loss on it, the logit model; all at ``logit_scale``), the share of all-zero gradients at
    the first iteration and along IFGSM's trajectory (one cell each, kind ``vanishing``), and each attack's
    ASR (one cell per attack and model, kind ``vanishing_attack``).

    ``eps``, ``max_iter``: every attack's step and iterations (and the trace's); ``samples``: the first
    samples of the run's sample (the trace covers them all, the ASR their initially correct ones);
    ``clip``: Keras's epsilon of the clipped model; ``composite``: the relevance attacks' LRP composite;
    ``attacks``: registry names or ``{ name, label, params }`` tables of our attacks.
    """

    logit_scale: float = 1.0
    models: tuple[str, ...] = MODELS
    clip: float = KERAS_EPSILON
    eps: float = 1 / 256
    max_iter: int = 100
    samples: int = 200
    composite: str = DEFAULT_COMPOSITE
    attacks: tuple[VanishingAttack, ...] = DEFAULT_ATTACKS

    def __post_init__(self) -> None:
        checks.finite_number("logit_scale", self.logit_scale, low=0.0, low_open=True)
        object.__setattr__(self, "logit_scale", float(self.logit_scale))
        object.__setattr__(self, "models", _models(self.models))
        object.__setattr__(self, "clip", ClippedLogSoftmax(self.clip).clip)
        object.__setattr__(self, "eps", checks.finite_number("eps", self.eps, low=0.0, low_open=True))
        checks.positive_int("max_iter", self.max_iter)
        checks.positive_int("samples", self.samples)
        if not isinstance(self.composite, str):
            raise ValueError(f"composite: expected a composite name, got {self.composite!r}")
        check_composite(self.composite)
        object.__setattr__(self, "attacks", _attacks(self.attacks))
        from xaiadv.plugins.attacks import make_config

        for index, attack in enumerate(self.attacks):
            try:
                make_config(attack.pattern, **attack.params, eps=self.eps, max_iter=self.max_iter)
            except (TypeError, ValueError) as error:
                raise ValueError(f"attacks[{index}].params: {error}") from error

    def check(self, config: RunConfig) -> None:
        if self.samples > config.samples:
            raise ValueError(
                f"samples: {self.samples} is more than the run's data.samples ({config.samples})"
            )

    def cell_count(self, config: RunConfig) -> int:
        return len(self.models) * (1 + len(self.attacks))

    def variant_key(self, variant: str) -> dict[str, Any]:
        """What one model's cells depend on: the variant, its scale, the clip where it has one, the sample."""
        key = {"model": variant, "logit_scale": self.logit_scale, "samples": self.samples}
        return {**key, "clip": self.clip} if variant == "clipped" else key

    def run(self, run: Run) -> None:
        for variant in self.models:
            run.cell(
                "vanishing",
                variant,
                run.key(self.variant_key(variant), self.eps, self.max_iter),
                lambda variant=variant: run_trace_cell(self, run, variant),
                about={"name": "xaiadv:VanishingGradientStudy", "model": variant},
            )
        for attack in self.attacks:
            for variant in self.models:
                run.cell(
                    "vanishing_attack",
                    attack_label(attack.label, variant),
                    run.key(
                        self.variant_key(variant), self.eps, self.max_iter, self.composite, asdict(attack)
                    ),
                    lambda attack=attack, variant=variant: run_vanishing_attack_cell(
                        self, run, attack, variant
                    ),
                    about={"name": attack.name, "params": dict(attack.params), "model": variant},
                )


def attack_label(attack: str, variant: str) -> str:
    """A ``vanishing_attack`` cell's label: ``IFGSM on softmax``."""
    return f"{attack} on {variant}"


def _study_inputs(
    study: VanishingGradientStudy, run: Run, variant: str
) -> tuple[SoftmaxOutput, torch.Tensor, torch.Tensor]:
    model = study_model(run.model, variant, logit_scale=study.logit_scale, clip=study.clip).to(run.device)
    return model, run.sample.x[: study.samples].to(run.device), run.sample.y[: study.samples].to(run.device)


def run_trace_cell(
    study: VanishingGradientStudy, run: Run, variant: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One model's zero gradients: the first iteration's share (all samples, and the initially correct
    ones) and the share at each IFGSM iterate; whether the model's outputs look like probabilities."""
    model, x, y = _study_inputs(study, run, variant)
    correct = torch.as_tensor(run.sample.initially_correct[: study.samples]).to(run.device)
    masks = zero_gradient_trace(
        model, x, y, eps=study.eps, max_iter=study.max_iter, batch_size=run.config.batch_size
    )
    with torch.no_grad():
        probabilities = checks.looks_like_probabilities(model(x[: run.config.batch_size]))
    first = masks[0]
    record = {
        "kind": "vanishing",
        "label": variant,
        "status": "done",
        "model": variant,
        "logit_scale": study.logit_scale,
        "clip": study.clip if variant == "clipped" else None,
        "outputs_probabilities": probabilities,
        "first": ZeroGradientShare(len(first), int(first.sum())).to_dict(),
        "first_correct": ZeroGradientShare(int(correct.sum()), int(first[correct].sum())).to_dict(),
        "trace": masks.double().mean(1).tolist(),
    }
    undefined = {} if variant == "clipped" else {"clip": "only the clipped model clips its probabilities"}
    if not correct.any():
        undefined["first_correct"] = "no initially correct sample"
    return {**record, "undefined": undefined}, {"zero": masks.cpu().numpy()}


def run_vanishing_attack_cell(
    study: VanishingGradientStudy, run: Run, attack: VanishingAttack, variant: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One attack on one model over the initially correct samples: its ASR (thesis eq. 4.15), and the share
    of those samples whose first gradient is all zero, beside the ASR among them and among the others."""
    model, x, y = _study_inputs(study, run, variant)
    index = np.flatnonzero(run.sample.initially_correct[: study.samples])
    x, y = x[index], y[index]
    with recorded_warnings() as raised:
        success = attack_success(
            model,
            x,
            y,
            attack,
            eps=study.eps,
            max_iter=study.max_iter,
            composite=study.composite,
            seed=run.config.seed,
            batch_size=run.config.batch_size,
        ).numpy()
    zero = zero_gradient_mask(model, x, y, batch_size=run.config.batch_size).cpu().numpy()
    record = {
        "kind": "vanishing_attack",
        "label": attack_label(attack.label, variant),
        "status": "done",
        "attack": attack.label,
        "name": attack.name,
        "params": dict(attack.params),
        "model": variant,
        "n_correct": len(index),
        "n_success": int(success.sum()),
        "asr": float(success.mean()) if len(index) else None,
        "n_zero": int(zero.sum()),
        "asr_zero": float(success[zero].mean()) if zero.any() else None,
        "asr_nonzero": float(success[~zero].mean()) if (~zero).any() else None,
        "warnings": raised,
    }
    undefined = {}
    if not len(index):
        undefined["asr"] = "no initially correct sample"
    if not zero.any():
        undefined["asr_zero"] = "no sample with an all-zero first gradient"
    if zero.all():
        undefined["asr_nonzero"] = "every sample has an all-zero first gradient"
    return {**record, "undefined": undefined}, {"index": index, "success": success, "zero": zero}


# -------------------------------------------------------------------------------------------------
# the report's section

#: What each model of the table is, for the report.
MODEL_NOTES = {
    "softmax": "the network with softmax(logit_scale * z) inside, cross-entropy over its probabilities",
    "clipped": "log(clip(softmax(logit_scale * z), clip, 1 - clip)), Keras's categorical_crossentropy",
    "logits": "logit_scale * z, the same network without its softmax",
}


def report_section(results: Mapping[str, Any], run: RunDirectory) -> str:
    """Thesis Table 4.2 beside the attacks: per model, the first-iteration zero-gradient share, the share at
    IFGSM's last iterate, each attack's ASR and the best; a figure of the share over iterations."""
    from .report import failed_lines, fmt, table

    traces = results.get("vanishings") or {}
    cells = results.get("vanishing_attacks") or {}
    if not traces and not cells:
        return ""
    done = {label: cell for label, cell in traces.items() if cell["status"] == "done"}
    attacked = {label: cell for label, cell in cells.items() if cell["status"] == "done"}
    attacks = list(dict.fromkeys(cell["attack"] for cell in attacked.values()))
    lines = ["## Vanishing gradients (thesis 4.2.4, Table 4.2, Algorithm 8)", ""]
    if done:
        scale = next(iter(done.values()))["logit_scale"]
        lines += [
            f"The run's model made to saturate at logit scale {fmt(scale)} (an inverse temperature: no "
            "prediction changes). Zero share: samples whose input gradient of the attacks' cross-entropy "
            "(eq. 2.30) is all zero, at the clean input (first iteration, Table 4.2's number, over all "
            "samples) and at IFGSM's last iterate (early stop off). ASR (eq. 4.15) over the initially "
            "correct samples. Models: " + "; ".join(f"{label}: {MODEL_NOTES[label]}" for label in done) + ".",
        ]
    header = [
        "model",
        "n",
        "zero share (first iteration)",
        "zero share (last)",
        *[f"ASR {a}" for a in attacks],
    ]
    header += ["max(ASR)", "according method"]
    rows = []
    for label in dict.fromkeys([*done, *(cell["model"] for cell in attacked.values())]):
        trace = done.get(label)
        asr = {cell["attack"]: cell["asr"] for cell in attacked.values() if cell["model"] == label}
        best = max((a for a in asr if asr[a] is not None), key=lambda a: asr[a], default=None)
        rows.append(
            [
                label,
                None if trace is None else trace["first"]["n"],
                None if trace is None else trace["first"]["share"],
                None if trace is None else trace["trace"][-1],
                *[asr.get(a) for a in attacks],
                None if best is None else asr[best],
                best,
            ]
        )
    lines += ["", table(header, rows)]
    if attacked:
        lines += [
            "",
            "ASR among the initially correct samples whose first gradient is all zero (n zero) and among "
            "the others:",
            "",
            table(
                ("attack", "model", "n zero", "ASR zero", "ASR others"),
                [
                    [cell["attack"], cell["model"], cell["n_zero"], cell["asr_zero"], cell["asr_nonzero"]]
                    for cell in attacked.values()
                ],
            ),
        ]
    raised: dict[str, str] = {}
    for label, cell in attacked.items():
        for message in cell["warnings"]:
            raised.setdefault(message, label)
    if raised:
        lines += ["", "Warnings the attacks raised (recorded, not silenced):", ""]
        lines += [f"- {message} (first in {label})" for message, label in raised.items()]
    if done:
        path = plot_zero_share(
            {label: cell["trace"] for label, cell in done.items()}, run.figures / "vanishing-gradients.png"
        )
        lines += ["", f"![zero-gradient share over iterations](figures/{path.name})"]
    lines += failed_lines({**traces, **cells})
    return "\n".join(lines)


def plot_zero_share(traces: Mapping[str, Sequence[float]], path: Path) -> Path:
    """The share of all-zero gradients at each IFGSM iterate, one line per model (each its own line style:
    the softmax and the logit model often coincide)."""
    from . import figures

    if not traces or not all(len(trace) for trace in traces.values()):
        raise ValueError("traces: expected a non-empty series per model")
    figure = figures.new_figure((6.4, 4.0))
    axes = figure.subplots()
    for index, (label, trace) in enumerate(traces.items()):
        style = figures.LINESTYLES[index % len(figures.LINESTYLES)]  # equal series stay visible
        axes.plot(range(len(trace)), trace, color=f"C{index % 10}", linestyle=style, label=str(label))
    axes.set(
        xlabel="IFGSM iteration",
        ylabel="share of all-zero gradients",
        ylim=(-0.02, 1.02),
        title="Zero gradients along IFGSM (thesis Table 4.2)",
    )
    axes.grid(alpha=0.3)
    axes.legend()
    return figures.save_png(figure, path)
