"""The heatmap study (seed 001 Fig. 3; thesis A.1): clean vs adversarial LRP heatmaps, per attack, in numbers.

Seed 001 shows the LRP heatmap of an image beside that of its adversarial example and reads them in words
("the colours practically reversed" after FGSM; "the network focuses on the adverse pixel" after the
one-pixel attack). For each attack of a run, over its successful samples, this study computes the four
heatmaps of :func:`~xaiadv.evaluation.heatmaps.explanation_heatmaps` and the numbers of
:func:`~xaiadv.evaluation.heatmaps.heatmap_numbers` (Spearman, top-k overlap, relevance share on the
perturbed values beside the share of values perturbed), summarized by their mean and median, and keeps a
few samples' heatmaps for the report's figure. :func:`explain_attack` is the typed library function;
:class:`HeatmapStudy` (``xaiadv:HeatmapStudy``) runs it as one resumable cell per attack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.model import Classifier
from xaiadv.plugins.relevance import DEFAULT_COMPOSITE, check_composite

from .heatmaps import Heatmaps, explanation_heatmaps, heatmap_numbers
from .models import dataset_input_shape
from .studies import Study, attack_labels, check_attack_labels, chosen_attacks, studies

if TYPE_CHECKING:
    from .config import RunConfig
    from .run import Run

#: The per-sample numbers, in the order the report shows them (heatmaps.py defines each).
NUMBERS = ("spearman", "top_k_overlap", "perturbed_share", "changed_share")
#: The label of the one failed cell the study records when no attack has a sample to explain.
NOTHING_TO_EXPLAIN = "xaiadv:HeatmapStudy"


@dataclass(frozen=True)
class AttackExplanation:
    """The heatmaps (each (N, C, H, W)) of N successful samples and their numbers (each (N,), NaN where
    undefined: a constant heatmap has no rank correlation, a zero one no relevance share)."""

    heatmaps: Heatmaps
    numbers: dict[str, np.ndarray]

    def summary(self) -> tuple[dict[str, dict[str, float | int | None]], dict[str, str]]:
        """Mean, median and count of the defined values of each number; and why a number is null."""
        summary, undefined = {}, {}
        for name in NUMBERS:
            values = self.numbers[name][np.isfinite(self.numbers[name])]
            if values.size:
                summary[name] = {"mean": float(values.mean()), "median": float(np.median(values))}
            else:
                summary[name] = {"mean": None, "median": None}
                undefined[name] = (
                    "no successful sample" if not len(self.numbers[name]) else "undefined for every sample"
                )
            summary[name]["n"] = int(values.size)
        return summary, undefined


def explain_attack(
    model: nn.Module | Classifier,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    original: torch.Tensor,
    adversarial: torch.Tensor,
    *,
    composite: str = DEFAULT_COMPOSITE,
    k: int = 16,
    batch_size: int = 128,
) -> AttackExplanation:
    """Heatmaps and numbers of one attack's successful pairs (seed 001 Fig. 3 as numbers).

    ``x``, ``x_adv``: (N, C, H, W) clean images and their adversarial examples; ``original``,
    ``adversarial``: (N,) the classes before and after the attack; ``k``: the top-k of the overlap.
    """
    heatmaps = explanation_heatmaps(
        model, x, x_adv, original, adversarial, composite=composite, batch_size=batch_size
    )
    numbers = heatmap_numbers(heatmaps, x.detach().cpu().numpy(), x_adv.detach().cpu().numpy(), k=k)
    return AttackExplanation(heatmaps, numbers)


@studies.register("xaiadv:HeatmapStudy")
@dataclass(frozen=True)
class HeatmapStudy(Study):
    """Seed 001 Fig. 3 for each attack of the run: one cell per attack, over its successful samples.

    ``composite``: the LRP composite (default the seeds' epsilon/flat); ``examples``: the samples drawn per
    attack in the report's figure; ``k``: the top-k of the overlap (at most the values of one image);
    ``attacks``: the attack labels explained, all when empty.
    """

    composite: str = DEFAULT_COMPOSITE
    examples: int = 4
    k: int = 16
    attacks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_composite(self.composite)
        checks.positive_int("examples", self.examples)
        checks.positive_int("k", self.k)
        object.__setattr__(self, "attacks", attack_labels("attacks", self.attacks))

    def check(self, config: RunConfig) -> None:
        check_attack_labels("attacks", self.attacks, config)
        check_top_k(self.k, config)

    def cell_count(self, config: RunConfig) -> int:
        return len(chosen_attacks(self.attacks, config))

    def run(self, run: Run) -> None:
        labels = chosen_attacks(self.attacks, run.config)
        done = [label for label in labels if run.attacks[label]["status"] == "done"]
        parameters = asdict(self)
        if not any(run.attacks[label]["n_success"] for label in done):
            run.cell(
                "heatmap",
                NOTHING_TO_EXPLAIN,
                run.key(parameters, {label: run.attacks[label]["key"] for label in labels}),
                lambda: _nothing_to_explain(run, labels),
                about={"name": NOTHING_TO_EXPLAIN},
            )
            return
        for label in done:
            run.cell(
                "heatmap",
                label,
                run.key(parameters, run.attacks[label]["key"]),
                lambda label=label: run_heatmap_cell(self, run, label),
                about={"name": "xaiadv:HeatmapStudy", "attack": run.attacks[label]["name"]},
            )


def check_top_k(k: int, config: RunConfig) -> None:
    """ValueError naming ``k`` when the top-k overlap's k exceeds the values of one image of the run's data
    set or of its fallback (checked with the config, before any cell)."""
    for dataset in (config.dataset, config.fallback):
        values = None if dataset is None else int(np.prod(dataset_input_shape(dataset)))
        if values is not None and k > values:
            raise ValueError(f"k: {k} is more than the {values} values of a {dataset} image")


def _nothing_to_explain(run: Run, labels: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    said = ", ".join(
        f"{label}: failed"
        if run.attacks[label]["status"] != "done"
        else f"{label}: 0 of {run.attacks[label]['n_correct']}"
        for label in labels
    )
    raise ValueError(
        f"no attack of this run has a successful adversarial example to explain ({said}); the heatmap "
        "study compares clean and adversarial heatmaps of successful samples only"
    )


def run_heatmap_cell(
    study: HeatmapStudy, run: Run, label: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The heatmaps and numbers of one attack's successful samples: (the cell's record, its arrays)."""
    attack = run.attacks[label]
    arrays = run.directory.load_arrays("attack", label)
    index = np.flatnonzero(arrays["successful"])
    record = {
        "kind": "heatmap",
        "label": label,
        "attack": attack["name"],
        "status": "done",
        "composite": study.composite,
        "k": study.k,
        "n": len(index),
    }
    if not len(index):
        reason = "no successful sample"
        record["numbers"] = {name: {"mean": None, "median": None, "n": 0} for name in NUMBERS}
        return {**record, "undefined": dict.fromkeys(NUMBERS, reason)}, {}
    device, rows = run.device, torch.as_tensor(index)
    x, x_adv = run.sample.x[rows], torch.as_tensor(arrays["x_adv"][index])
    original, adversarial = run.sample.y[rows], torch.as_tensor(arrays["adversarial_prediction"][index])
    explanation = explain_attack(
        run.model,
        x.to(device),
        x_adv.to(device),
        original.to(device),
        adversarial.to(device),
        composite=study.composite,
        k=study.k,
        batch_size=run.config.batch_size,
    )
    record["numbers"], record["undefined"] = explanation.summary()
    shown = slice(0, study.examples)
    names = run.data.classes
    titles = [
        f"{names[a]} -> {names[b]}"
        for a, b in zip(original[shown].tolist(), adversarial[shown].tolist(), strict=True)
    ]
    examples = {
        f"example_{name}": getattr(explanation.heatmaps, name)[shown]
        for name in Heatmaps.__dataclass_fields__
    }
    return record, {
        "index": index,
        **explanation.numbers,
        "example_x": x[shown].numpy(),
        "example_x_adv": x_adv[shown].numpy(),
        "example_titles": np.array(titles, dtype=np.str_),
        **{name: values.astype(np.float32) for name, values in examples.items()},
    }


def example_heatmaps(arrays: Mapping[str, np.ndarray]) -> Heatmaps:
    """The saved example heatmaps of a heatmap cell (what the report's figure draws)."""
    return Heatmaps(*(arrays[f"example_{name}"] for name in Heatmaps.__dataclass_fields__))
