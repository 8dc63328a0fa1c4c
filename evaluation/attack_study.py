"""The attack study (thesis chapter 4): every attack on the same model, sample and bounds, on equal terms.

Per attack: ASR over the initially correct samples (thesis eq. 4.15), the L0/L1/L2/Linf distributions of
the successful perturbations, the mean confidence of the true and the adversarial class after success
(Amirian Table 1), seconds per image, and for the iterative attacks a per-iteration curve (Figs. 4.6-4.10).
Ours record their own trace; the libraries' attacks are driven through an :class:`IterateRecorder`
around the model, since Foolbox and torchattacks have no callbacks (ART's PGD family is recorded the same
way, so all three are measured by one instrument). :class:`AttackStudy` (``xaiadv:AttackStudy``) adds the
equal-ASR table and the AutoAttack-style warnings over the run's attack cells.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xaiadv.bridge.registry import build_attack

from .curves import IterateRecorder, concat_records, record_from_trace, summarize
from .metrics import (
    attack_success_rate,
    cheapest_share_mean,
    mean_confidence,
    norm_summary,
    perturbation_norms,
    successes_needed,
)
from .studies import Study, attack_labels, check_attack_labels, studies

if TYPE_CHECKING:
    from .config import AttackSpec, RunConfig
    from .run import Run

logger = logging.getLogger(__name__)

NORMS = ("L0", "L1", "L2", "Linf")
#: Library attacks whose every full-batch forward is one gradient step, so a recorded forward is an
#: iterate. Others (DeepFool, Carlini-Wagner, one-pixel) also call the model, but their forwards are
#: line searches, binary-search restarts or population members: no per-iteration curve is drawn for them.
STEP_PER_FORWARD = frozenset(
    {
        "art:BasicIterativeMethod",
        "art:ProjectedGradientDescent",
        "art:ProjectedGradientDescentPyTorch",
        "art:MomentumIterativeMethod",
        "foolbox:LinfPGD",
        "foolbox:L2PGD",
        "foolbox:L1PGD",
        "foolbox:LinfBasicIterativeAttack",
        "foolbox:L2BasicIterativeAttack",
        "foolbox:L1BasicIterativeAttack",
        "foolbox:SparseL1DescentAttack",
        "torchattacks:PGD",
        "torchattacks:BIM",
        "torchattacks:PGDL2",
        "torchattacks:MIFGSM",
    }
)
#: Single-step or black-box attacks (by registry name), and the name parts of white-box iterative attacks
#: they should not beat (AutoAttack's check: a weaker attack beating a stronger one means the stronger
#: one is misconfigured or its gradients are masked).
WEAK_ATTACKS = frozenset(
    {
        "art:FastGradientMethod",
        "art:PixelAttack",
        "art:SquareAttack",
        "art:HopSkipJump",
        "art:BoundaryAttack",
        "foolbox:FGSM",
        "foolbox:L2FastGradientAttack",
        "torchattacks:FGSM",
        "torchattacks:Square",
        "torchattacks:OnePixel",
    }
)
STRONG_PARTS = ("BasicIterative", "ProjectedGradientDescent", "PGD", "BIM", "LRPGrad")


@dataclass(frozen=True)
class Sample:
    """The fixed test sample and the clean model's view of it (everything on CPU, numpy where read)."""

    x: torch.Tensor
    y: torch.Tensor
    prediction: np.ndarray
    probabilities: np.ndarray

    @property
    def initially_correct(self) -> np.ndarray:
        return self.prediction == self.y.numpy()

    def head(self, n: int | None) -> Sample:
        """The first ``n`` samples (all when n is None)."""
        if n is None or n >= len(self.y):
            return self
        return Sample(self.x[:n], self.y[:n], self.prediction[:n], self.probabilities[:n])


def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits of ``x`` in mini-batches, as a float64 numpy array."""
    with torch.no_grad():
        chunks = [
            model(x[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)
        ]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)


def run_attack_cell(
    spec: AttackSpec,
    model: nn.Module,
    sample: Sample,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run one attack over the sample in mini-batches: (the cell's JSON summary, its arrays)."""
    sample = sample.head(spec.samples)
    is_ours = spec.name.startswith("xaiadv:")
    records_curve = is_ours or spec.name in STEP_PER_FORWARD
    recorder = IterateRecorder(model)
    params = {**spec.params, "trace": True} if is_ours else dict(spec.params)
    attack = build_attack(spec.name, model=model if is_ours else recorder, bounds=(0.0, 1.0), **params)
    batches, records = [], []
    start = time.perf_counter()
    for i in tqdm(range(0, len(sample.y), batch_size), desc=spec.label, leave=False, disable=not progress):
        x, y = sample.x[i : i + batch_size].to(device), sample.y[i : i + batch_size].to(device)
        if is_ours:
            batches.append(attack(x, y).detach().cpu())
            records.append(record_from_trace(attack.last_result.trace))
        else:
            with recorder.recording(x, y):
                x_adv = attack(x, y).detach()
                recorder.end_at(x_adv)
            batches.append(x_adv.cpu())
            records.append(recorder.record)
    seconds = time.perf_counter() - start
    x_adv = torch.cat(batches).float()
    curve = summarize(concat_records(records), sample.initially_correct) if records_curve else None
    return _summarize_cell(spec, model, sample, x_adv, seconds, curve, batch_size, device)


def _summarize_cell(
    spec: AttackSpec,
    model: nn.Module,
    sample: Sample,
    x_adv: torch.Tensor,
    seconds: float,
    curve: Any,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    _check_attack_output(spec, sample.x, x_adv)
    probabilities = softmax(predict(model, x_adv, batch_size, device))
    adversarial_prediction = probabilities.argmax(1)
    y = sample.y.numpy()
    successful = sample.initially_correct & (adversarial_prediction != y)
    norms = perturbation_norms(sample.x.numpy(), x_adv.numpy())
    cell = {
        "kind": "attack",
        "label": spec.label,
        "name": spec.name,
        "params": dict(spec.params),
        "status": "done",
        "n": len(y),
        "n_correct": int(sample.initially_correct.sum()),
        "n_success": int(successful.sum()),
        "asr": attack_success_rate(y, sample.prediction, adversarial_prediction),
        "norms": {name: norm_summary(norms[name][successful]) for name in NORMS},
        "confidence": mean_confidence(probabilities, y, adversarial_prediction, successful),
        "seconds_per_image": seconds / max(len(y), 1),
        "curve": None if curve is None else curve.to_dict(),
        "undefined": _undefined(sample.initially_correct, successful),
    }
    arrays = {
        "x_adv": x_adv.numpy(),
        "successful": successful,
        "adversarial_prediction": adversarial_prediction.astype(np.int64),
        **{f"norm_{name}": norms[name] for name in NORMS},
    }
    return cell, arrays


def _undefined(initially_correct: np.ndarray, successful: np.ndarray) -> dict[str, str]:
    """Why a figure of the cell is null (results.json has no NaN): metric -> reason."""
    if not initially_correct.any():
        reason = "no sample was classified correctly before the attack"
        return {"asr": reason, "norms": reason, "confidence": reason}
    if not successful.any():
        return {"norms": "no sample succeeded", "confidence": "no sample succeeded"}
    return {}


def _check_attack_output(spec: AttackSpec, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """An attack must return finite inputs shaped like x inside the bounds; anything else fails the cell."""
    if x_adv.shape != x.shape:
        raise ValueError(f"{spec.name} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise ValueError(f"{spec.name} returned NaN or infinite values")
    if x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        raise ValueError(f"{spec.name} returned values outside the bounds [0, 1]")


def zero_gradient_share(
    model: nn.Module, sample: Sample, batch_size: int, device: torch.device
) -> float | None:
    """Share of initially correct samples whose cross-entropy input gradient is exactly zero (Table 4.2)."""
    correct = np.flatnonzero(sample.initially_correct)
    if len(correct) == 0:
        return None
    zero = 0
    for i in range(0, len(correct), batch_size):
        rows = torch.as_tensor(correct[i : i + batch_size])
        x = sample.x[rows].to(device).requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), sample.y[rows].to(device), reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
        zero += int((gradient.flatten(1) == 0).all(1).sum())
    return zero / len(correct)


def equal_asr_table(
    cells: dict[str, dict[str, Any]],
    norm_arrays: dict[str, dict[str, np.ndarray]],
    compared: Sequence[str] = (),
) -> dict[str, Any]:
    """Thesis Table 5.1: each attack's L1/L2/Linf at the highest ASR every compared attack reaches.

    ``compared``: the labels to compare (empty: all). Each attack is taken at that common ASR by its
    cheapest successes (metrics.cheapest_share_mean); attacks that failed, never succeeded or were not
    chosen are listed as excluded.
    """
    chosen = compared or list(cells)
    done = {
        label: cells[label]
        for label in chosen
        if cells[label]["status"] == "done" and cells[label]["n_success"] > 0
    }
    excluded = [label for label in cells if label not in done]
    if not done:
        return {"asr": None, "reason": "no compared attack succeeded", "rows": {}, "excluded": excluded}
    common = min(cell["asr"] for cell in done.values())
    rows = {}
    for label, cell in done.items():
        arrays = norm_arrays[label]
        successful = arrays["successful"]
        rows[label] = {
            "n": successes_needed(cell["n_correct"], common),
            **{
                name: cheapest_share_mean(arrays[f"norm_{name}"][successful], cell["n_correct"], common)
                for name in ("L1", "L2", "Linf")
            },
        }
    return {"asr": common, "rows": rows, "excluded": excluded}


def attack_warnings(cells: dict[str, dict[str, Any]]) -> list[str]:
    """AutoAttack-style check: a single-step or black-box attack beating every white-box iterative one."""
    done = {
        label: cell for label, cell in cells.items() if cell["status"] == "done" and cell["asr"] is not None
    }
    weak = {label: cell for label, cell in done.items() if cell["name"] in WEAK_ATTACKS}
    strong = {
        label: cell for label, cell in done.items() if any(part in cell["name"] for part in STRONG_PARTS)
    }
    if not weak or not strong:
        return []
    best_weak = max(weak, key=lambda label: weak[label]["asr"])
    best_strong = max(cell["asr"] for cell in strong.values())
    if weak[best_weak]["asr"] > best_strong + 0.01:
        return [
            f"{best_weak} (single-step or black-box) reaches ASR {weak[best_weak]['asr']:.3f}, above every "
            f"white-box iterative attack (best {best_strong:.3f}): the iterative attacks' budget or step may "
            "be too small, or the gradients masked"
        ]
    return []


@studies.register("xaiadv:AttackStudy")
@dataclass(frozen=True)
class AttackStudy(Study):
    """Thesis chapter 4 over the run's attack cells: the equal-ASR table (Table 5.1) and the warnings.

    ``equal_asr``: the attack labels compared at equal ASR; empty means all of them. An attack that
    rarely succeeds would otherwise pull the common ASR down to where nothing is compared.
    """

    equal_asr: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "equal_asr", attack_labels("equal_asr", self.equal_asr))

    def check(self, config: RunConfig) -> None:
        check_attack_labels("equal_asr", self.equal_asr, config)

    def run(self, run: Run) -> None:
        cells = run.attacks
        arrays = {
            label: run.directory.load_arrays("attack", label)
            for label, cell in cells.items()
            if cell["status"] == "done"
        }
        run.results["equal_asr"] = equal_asr_table(cells, arrays, self.equal_asr)
        run.results["warnings"] = run.results["checks"]["warnings"] + attack_warnings(cells)
