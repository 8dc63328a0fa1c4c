"""The detector study's adaptive column: each detector against an attack that knows it, and one that does not.

A detector figure measured against an attack that ignores the detector overstates it, often from AUC 0.95+
to near-zero detection (Carlini & Wagner 2017, "Adversarial examples are not easily detected"; Tramer et
al. 2020, "On adaptive attacks to adversarial example defenses"). For each detector of a run and each budget
of the study's ``adaptive`` parameters, on the initially correct sample images: the non-adaptive attack
(PGD on the cross-entropy at that norm, eps and step count, blind to the detector) and the adaptive one
(detector-aware PGD against that detector at its own calibrated threshold; seed 002 eq. 6 for I-defender).
For each: the bypass rate (misclassified and not flagged), and the detector's AUC and TPR at 5% FPR on the
misclassified adversarial examples against the clean images. A detector without a differentiable score has
its non-adaptive numbers and a null adaptive column with the reason.

The sanity checks of Carlini et al. 2019 ("On evaluating adversarial robustness") warn in the report: the
adaptive attack doing worse than the non-adaptive one at equal budget, a bypass rate that does not grow
with eps, an unbounded budget that does not reach close to 100%, and detector-score gradients that are
zero or NaN on most samples. :func:`gray_box_bypass` is seed 002's gray-box setting (section 4.3,
Tables 7-9): crafted on a source model and its own I-defender, judged on the target's.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.adaptive import (
    AdaptiveConfig,
    DifferentiableDetector,
    detector_aware_pgd,
    differentiable_detector,
    pgd,
    vanishing_gradient_share,
)
from xaiadv.plugins.model import Classifier

from . import figures
from .metrics import roc_auc, tpr_at_fpr

if TYPE_CHECKING:
    from .rundir import RunDirectory

#: The norms a budget can name, as the report writes them.
NORMS = {"Linf": math.inf, "L2": 2.0}
#: The false-positive rate of the TPR column.
FPR = 0.05
#: Bypass rates closer than this are equal for the sanity checks (a few samples of sampling noise).
TOLERANCE = 0.05
#: An unbounded budget should reach at least this bypass rate (Carlini et al. 2019, section 5.2).
UNBOUNDED_FLOOR = 0.95
#: Gradients of the detector score that vanish on more than this share make the adaptive figure suspect.
VANISHING_MOST = 0.5
#: The two attacks of each cell, in the report's order.
ATTACKS = ("non_adaptive", "adaptive")
QUOTE = (
    "Quote the adaptive column: a detector is only as good as its figure against an attacker who knows it "
    "(Carlini & Wagner 2017; Tramer et al. 2020); the non-adaptive column shows how much an evaluation that "
    "ignores the attacker would overstate it."
)

#: (scores, flags) of a fitted detector on a batch of inputs (as the detector study's ``Detect``).
Detect = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class AdaptiveSettings:
    """The adaptive column's budgets and schedule (``adaptive = {...}`` of the detector study).

    eps: the budgets (input units, ascending); norm: "Linf" or "L2"; max_iter: PGD steps of both attacks
    (step 2.5 eps / max_iter, Madry et al. 2018); search_steps: trade-off weights the adaptive attack
    tries per sample (C&W); kappa: its confidence margin; unbounded: also a budget covering the whole
    input range (a sanity check); samples: the initially correct sample images attacked, at most.
    """

    eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    norm: str = "Linf"
    max_iter: int = 20
    search_steps: int = 3
    kappa: float = 0.0
    unbounded: bool = True
    samples: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.eps, str) or not isinstance(self.eps, Sequence) or not self.eps:
            raise ValueError(f"eps: expected a non-empty list of budgets > 0, got {self.eps!r}")
        eps = tuple(checks.finite_number("eps", value, low=0.0, low_open=True) for value in self.eps)
        if list(eps) != sorted(set(eps)):
            raise ValueError(f"eps: expected distinct budgets in ascending order, got {list(eps)}")
        object.__setattr__(self, "eps", tuple(float(value) for value in eps))
        checks.one_of("norm", self.norm, tuple(NORMS))
        checks.positive_int("max_iter", self.max_iter)
        checks.positive_int("search_steps", self.search_steps)
        checks.finite_number("kappa", self.kappa, low=0.0)
        checks.boolean("unbounded", self.unbounded)
        checks.positive_int("samples", self.samples)

    @classmethod
    def of(cls, value: object) -> AdaptiveSettings | None:
        """The settings of a study parameter: None, a mapping of the fields (others refused), or settings."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"adaptive: expected a table of {_field_names()}, got {value!r}")
        unknown = sorted(set(value) - set(_field_names()))
        if unknown:
            raise ValueError(f"adaptive: unknown key(s) {unknown}; valid: {', '.join(_field_names())}")
        try:
            return cls(**value)
        except ValueError as error:
            raise ValueError(f"adaptive.{error}") from error

    def budgets(self, input_shape: Sequence[int], bounds: tuple[float, float]) -> list[tuple[str, float]]:
        """(label, eps) of each budget; the unbounded one is the diameter of the input box in the norm."""
        found = [(f"{self.norm} {eps:g}", eps) for eps in self.eps]
        if self.unbounded:
            width = bounds[1] - bounds[0]
            diameter = width if self.norm == "Linf" else width * math.sqrt(math.prod(input_shape))
            found.append((f"{self.norm} unbounded", float(diameter)))
        return found

    def config(self, eps: float) -> AdaptiveConfig:
        """Both attacks' configuration at budget ``eps``."""
        return AdaptiveConfig(
            norm=NORMS[self.norm],
            eps=eps,
            eps_step=2.5 * eps / self.max_iter,
            max_iter=self.max_iter,
            search_steps=self.search_steps,
            kappa=self.kappa,
        )


def _field_names() -> list[str]:
    return [field.name for field in dataclasses.fields(AdaptiveSettings)]


def adaptive_scorer(
    detector: object | None, why_none: str
) -> tuple[DifferentiableDetector | None, str | None]:
    """The detector's differentiable score, or None and the reason (``why_none`` when there is no detector
    object at all, e.g. ART's trained peers)."""
    if detector is None:
        return None, why_none
    try:
        return differentiable_detector(detector), None
    except TypeError as error:
        return None, f"no differentiable score: {error}"


def attack_numbers(
    misclassified: np.ndarray,
    scores: np.ndarray,
    flags: np.ndarray,
    clean_scores: np.ndarray,
) -> dict[str, Any]:
    """Bypass rate over all N attacked samples, and the detector's AUC and TPR at :data:`FPR` on the
    misclassified ones against the clean images; a number that is undefined is None with its reason."""
    bypassed = misclassified & ~flags
    numbers: dict[str, Any] = {
        "n": len(misclassified),
        "misclassified": float(misclassified.mean()) if len(misclassified) else None,
        "bypass_rate": float(bypassed.mean()) if len(misclassified) else None,
        "auc": None,
        "tpr_at_5": None,
        "undefined": {},
    }
    positives = scores[misclassified]
    if not len(positives) or not len(clean_scores):
        reason = "no misclassified adversarial example" if len(clean_scores) else "no clean sample"
        numbers["undefined"] = {"auc": reason, "tpr_at_5": reason}
        return numbers
    auc, tpr = roc_auc(clean_scores, positives), tpr_at_fpr(clean_scores, positives, FPR)
    for name, value in (("auc", auc), ("tpr_at_5", tpr)):
        if math.isfinite(value):
            numbers[name] = float(value)
        else:
            numbers["undefined"][name] = "undefined (constant scores)"
    return numbers


def adaptive_cell(
    model: nn.Module,
    detect: Detect,
    scorer: DifferentiableDetector | None,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AdaptiveConfig,
    *,
    batch_size: int,
    x_non_adaptive: torch.Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Both attacks at one budget on clean, correctly classified ``x`` (N, ...) with labels ``y``: their
    numbers (the adaptive ones None without ``scorer``) and the share of vanishing score gradients.
    ``x_non_adaptive``: the blind PGD's examples of ``x`` when already crafted (:func:`blind_pgd`: they do
    not depend on the detector, so a study crafts them once per budget), else crafted here."""
    clean_scores, _ = detect(x.cpu().numpy())
    if x_non_adaptive is None:
        x_non_adaptive = blind_pgd(model, x, y, config, batch_size)
    crafted = {"non_adaptive": x_non_adaptive}
    share = None
    if scorer is not None:
        crafted["adaptive"] = _batched(
            lambda a, b: detector_aware_pgd(model, scorer, a, b, config=config).x_adv, x, y, batch_size
        )
        shares = [
            vanishing_gradient_share(scorer, x[i : i + batch_size]) * len(x[i : i + batch_size])
            for i in range(0, len(x), batch_size)
        ]
        share = sum(shares) / len(x) if len(x) else None
    record: dict[str, Any] = {"vanishing_gradient_share": share, "adaptive": None}
    arrays: dict[str, np.ndarray] = {"clean_scores": clean_scores}
    for name, x_adv in crafted.items():
        with torch.no_grad():
            predicted = torch.cat([model(x_adv[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        misclassified = (predicted.argmax(1) != y).cpu().numpy()
        scores, flags = detect(x_adv.cpu().numpy())
        record[name] = attack_numbers(misclassified, scores, np.asarray(flags, bool), clean_scores)
        arrays[f"x_{name}"], arrays[f"scores_{name}"] = x_adv.cpu().numpy(), scores
    return record, arrays


def blind_pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AdaptiveConfig, batch_size: int
) -> torch.Tensor:
    """The non-adaptive reference attack of one budget (:func:`~xaiadv.plugins.adaptive.pgd`), batched."""
    return _batched(lambda a, b: pgd(model, a, b, config=config), x, y, batch_size)


def _batched(
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    if not len(x):
        return x.clone()
    return torch.cat(
        [attack(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    )


# -------------------------------------------------------------------------------------------------
# the gray-box setting (seed 002 section 4.3, Tables 7-9)


@dataclass(frozen=True)
class GrayBoxResult:
    """Per sample (N,) bool: bypassed on the source (model + detector the attack saw: white-box) and on
    the target (the model and detector it is judged by); and the target's misclassification and flags."""

    x_adv: torch.Tensor
    source_bypassed: torch.Tensor
    target_misclassified: torch.Tensor
    target_flagged: torch.Tensor

    @property
    def target_bypassed(self) -> torch.Tensor:
        return self.target_misclassified & ~self.target_flagged


def gray_box_bypass(
    source_model: nn.Module | Classifier,
    source_detector: DifferentiableDetector,
    target_model: nn.Module | Classifier,
    target_detector: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: AdaptiveConfig | None = None,
) -> GrayBoxResult:
    """Seed 002's gray-box attack: detector-aware PGD crafted on an independently trained source model with
    its own fitted detector, then judged by the target model and the target's detector (its ``detect``)."""
    source = detector_aware_pgd(source_model, source_detector, x, y, config=config)
    target = Classifier.wrap(target_model)
    with torch.no_grad(), target.evaluating():
        misclassified = target.logits(source.x_adv).argmax(1) != torch.as_tensor(y, device=x.device)
    flagged = torch.as_tensor(target_detector.detect(source.x_adv), device=x.device).bool()
    return GrayBoxResult(source.x_adv, source.bypassed, misclassified, flagged)


# -------------------------------------------------------------------------------------------------
# the sanity checks (Carlini et al. 2019)


def adaptive_weaker(budget: str, non_adaptive: float | None, adaptive: float | None) -> str | None:
    """A warning when the adaptive attack bypasses less than the non-adaptive one at the same budget: it
    optimises more, so it is broken (too few steps or search steps, a bad gradient)."""
    if non_adaptive is None or adaptive is None or adaptive >= non_adaptive - TOLERANCE:
        return None
    return (
        f"at {budget} the adaptive attack bypasses less ({adaptive:.2f}) than the non-adaptive one "
        f"({non_adaptive:.2f}): the adaptive attack is not working (Carlini et al. 2019)"
    )


def bypass_not_growing(name: str, eps: Sequence[float], bypass: Sequence[float | None]) -> str | None:
    """A warning when the bypass rate falls as eps grows: a larger ball holds every point of a smaller
    one, so a working attack does at least as well."""
    points = [(e, b) for e, b in zip(eps, bypass, strict=True) if b is not None]
    for (small, low), (large, high) in itertools.pairwise(points):
        if high < low - TOLERANCE:
            return (
                f"the {name} bypass rate falls from {low:.2f} at eps {small:g} to {high:.2f} at eps "
                f"{large:g}: it should not shrink with the budget (Carlini et al. 2019)"
            )
    return None


def unbounded_short(name: str, bypass: float | None) -> str | None:
    """A warning when the unbounded budget does not bypass (almost) always: with the whole input range an
    attack can reach any image, so a rate well short of 100% means the attack, not the detector, failed."""
    if bypass is None or bypass >= UNBOUNDED_FLOOR:
        return None
    return (
        f"the unbounded {name} attack bypasses only {bypass:.2f} (< {UNBOUNDED_FLOOR:.2f}); with the whole "
        "input range it should reach close to 100% (Carlini et al. 2019)"
    )


def gradients_vanish(share: float | None) -> str | None:
    """A warning when the detector-score gradient is zero or NaN on most samples: the adaptive attack then
    has nothing to follow (Athalye et al. 2018: use BPDA or a surrogate)."""
    if share is None or share <= VANISHING_MOST:
        return None
    return (
        f"the detector score's gradient is zero or NaN on {share:.0%} of the samples: the adaptive attack "
        "follows nothing there (Athalye et al. 2018; Carlini et al. 2019)"
    )


def sanity_warnings(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every warning of one detector's done cells (in budget order)."""
    done = [cell for cell in cells if cell["status"] == "done"]
    warnings = []
    for cell in done:
        warnings.append(
            adaptive_weaker(cell["budget"], _bypass(cell, "non_adaptive"), _bypass(cell, "adaptive"))
        )
        warnings.append(gradients_vanish(cell["vanishing_gradient_share"]) if cell is done[0] else None)
        if cell["unbounded"]:
            warnings.append(unbounded_short("adaptive", _bypass(cell, "adaptive")))
    bounded = [cell for cell in done if not cell["unbounded"]]
    warnings.append(
        bypass_not_growing(
            "adaptive", [cell["eps"] for cell in bounded], [_bypass(cell, "adaptive") for cell in bounded]
        )
    )
    return [warning for warning in warnings if warning]


def _bypass(cell: Mapping[str, Any], attack: str) -> float | None:
    numbers = cell.get(attack)
    return None if numbers is None else numbers["bypass_rate"]


# -------------------------------------------------------------------------------------------------
# the report


HEADER = (
    "budget",
    "n",
    "bypass non-adaptive",
    "bypass adaptive",
    "AUC non-adaptive",
    "AUC adaptive",
    "TPR@5% non-adaptive",
    "TPR@5% adaptive",
)


def report_section(results: Mapping[str, Any], run: RunDirectory) -> str:
    """The adaptive column's tables (one per detector), the bypass-over-eps figure, the sanity warnings."""
    from .report import table  # the report imports this module's section

    cells = results.get("adaptives") or {}
    if not cells:
        return ""
    by_detector: dict[str, list[Mapping[str, Any]]] = {}
    for cell in cells.values():
        by_detector.setdefault(cell["detector"], []).append(cell)
    lines = [
        "### Adaptive evaluation: the attacker knows the detector",
        "",
        "Per budget, on the initially correct sample images: PGD blind to the detector (non-adaptive) and "
        "detector-aware PGD at the detector's own threshold (adaptive). Bypass: misclassified and not "
        "flagged, over all attacked images; AUC and TPR at 5% FPR: the misclassified adversarial examples "
        "against the clean images. " + QUOTE,
    ]
    curves = {}
    for detector, detector_cells in by_detector.items():
        lines += ["", f"#### {detector}", ""]
        rows = [_row(cell) for cell in detector_cells]
        lines.append(table(HEADER, rows))
        notes = sorted({cell["reason"] for cell in detector_cells if cell.get("reason")})
        notes += [f"Failed ({cell['budget']}): {cell['error']}" for cell in detector_cells if "error" in cell]
        lines += [f"\n{note}" for note in notes]
        warnings = sanity_warnings(detector_cells)
        lines += [f"\n**Warning:** {warning}." for warning in warnings]
        curve = _curve(detector_cells)
        if curve is not None:
            curves[detector] = curve
    if curves:
        path = figures.plot_bypass_curves(curves, run.figures / "adaptive-bypass.png")
        lines += ["", f"![bypass rate over eps](figures/{path.name})"]
    return "\n".join(lines)


def _row(cell: Mapping[str, Any]) -> list[object]:
    if cell["status"] != "done":
        return [cell.get("budget", cell["label"]), "failed", *([None] * 6)]
    numbers = [cell["non_adaptive"], cell["adaptive"] or {}]
    return [
        cell["budget"],
        cell["n"],
        *(part.get("bypass_rate") for part in numbers),
        *(part.get("auc") for part in numbers),
        *(part.get("tpr_at_5") for part in numbers),
    ]


def _curve(cells: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]] | None:
    done = [cell for cell in cells if cell["status"] == "done" and not cell["unbounded"]]
    if not done:
        return None
    return {
        "eps": [cell["eps"] for cell in done],
        "non_adaptive": [_bypass(cell, "non_adaptive") for cell in done],
        "adaptive": [_bypass(cell, "adaptive") for cell in done],
    }
