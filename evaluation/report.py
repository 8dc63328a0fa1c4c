"""The report a person reads: ``report.md`` and its PNG figures, rendered from a run's saved results.

``render_report(run_dir)`` needs only ``results.json`` and the cells' npz arrays, so ``xaiadv report``
re-renders a finished (or interrupted) run without recomputing anything. An incomplete run's report
says so in its first line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import figures
from .adaptive_study import report_section as adaptive_section
from .heatmap_study import NUMBERS, example_heatmaps
from .heatmaps import plot_heatmaps
from .retraining_study import report_section as retraining_section
from .rundir import SCHEMA_VERSION, RunDirectory
from .transfer_study import report_section as transfer_section
from .vanishing_study import report_section as vanishing_section

NORMS = ("L0", "L1", "L2", "Linf")
EXAMPLES = 4


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of a run folder; ValueError when it is missing or not a results file."""
    path = RunDirectory(run_dir).results
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ValueError(f"RUN_DIR: {path} does not exist; is {run_dir} a run folder?") from error
    except ValueError as error:
        raise ValueError(f"RUN_DIR: {path} is not valid JSON ({error})") from error
    if not isinstance(results, dict) or "schema_version" not in results:
        raise ValueError(f"RUN_DIR: {path} is not an xaiadv results file")
    if results["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"RUN_DIR: {path} has schema version {results['schema_version']!r}; this xaiadv reads "
            f"{SCHEMA_VERSION}: run the config again to rewrite it"
        )
    return results


def fmt(value: object, digits: int = 3) -> str:
    """A number for reading: 3 significant digits, integers as they are, None as 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def attack_rows(results: dict[str, Any]) -> list[list[object]]:
    """One row per attack: ASR, successes, median norms, confidences, seconds per image (or the error)."""
    rows = []
    for label, cell in results["attacks"].items():
        if cell["status"] != "done":
            rows.append([label, cell["name"], "failed", None, None, *([None] * 8)])
            continue
        medians = [cell["norms"][name]["median"] for name in NORMS]
        confidence = cell["confidence"]
        rows.append(
            [
                label,
                cell["name"],
                cell["n_correct"],
                cell["asr"],
                cell["n_success"],
                *medians,
                confidence["true_class"],
                confidence["adversarial_class"],
                cell["seconds_per_image"],
            ]
        )
    return rows


ATTACK_HEADER = (
    "attack",
    "name",
    "n correct",
    "ASR",
    "n success",
    "L0",
    "L1",
    "L2",
    "Linf",
    "p(true)",
    "p(adv)",
    "s/image",
)


def summary_table(results: dict[str, Any]) -> str:
    """The short table the CLI prints: ASR and median L1/L2/Linf per attack."""
    rows = [[row[0], row[3], row[4], row[6], row[7], row[8]] for row in attack_rows(results)]
    return table(("attack", "ASR", "n success", "L1", "L2", "Linf"), rows)


def render_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and the figures of a run folder from its saved results; returns the report path."""
    run = RunDirectory(run_dir)
    results = load_results(run.root)
    run.figures.mkdir(exist_ok=True)
    try:
        sections = [
            _header(results),
            _attack_section(results, run),
            _detector_section(results, run),
            _heatmap_section(results, run),
            _signature_section(results, run),
            retraining_section(results, run),
            transfer_section(results, run),
            vanishing_section(results, run),
        ]
    except (KeyError, TypeError, OSError) as error:
        raise ValueError(
            f"RUN_DIR: {run.results} or its arrays are incomplete or damaged ({type(error).__name__}: "
            f"{error}); run the config again to rewrite them"
        ) from error
    run.write_text(run.report, "\n\n".join(section for section in sections if section) + "\n")
    return run.report


def _header(results: dict[str, Any]) -> str:
    data, model, env = results["data"], results["model"], results["environment"]
    failed = results.get("failed_cells", [])
    if results.get("complete"):
        status = "complete"
    elif failed:
        status = f"INCOMPLETE: {len(failed)} cell(s) failed (their errors are below); rerun to retry them"
    else:
        status = "INCOMPLETE: interrupted or still running; rerun to finish"
    name = results.get("config", {}).get("name")
    lines = [
        "# xaiadv evaluation report" + (f": {name}" if name else ""),
        "",
        f"Status: **{status}**.",
        "",
        f"Data: {data['dataset']}"
        + (" (fallback: the configured data set was not found)" if data["fell_back"] else "")
        + f"; the first {data['n']} test images, {data['n_correct']} classified correctly before any attack.",
        f"Model: {model['kind']}, sha256 {model['sha256']}"
        + (
            f", test accuracy {fmt(model.get('test_accuracy'))}"
            if model.get("test_accuracy") is not None
            else ""
        )
        + ".",
        f"Seed {env['seed']}, device {env['device']}, git {env['git_revision'] or 'n/a'}, "
        f"torch {env['packages'].get('torch')}.",
    ]
    warnings = results.get("warnings", results["checks"]["warnings"])
    share = results["checks"]["zero_gradient_share"]
    lines += ["", f"Zero-gradient share of the clean sample (thesis Table 4.2): {fmt(share)}."]
    if warnings:
        lines += ["", "**Warnings**", ""] + [f"- {warning}" for warning in warnings]
    return "\n".join(lines)


def _attack_section(results: dict[str, Any], run: RunDirectory) -> str:
    attacks = results["attacks"]
    if not attacks:
        return ""
    lines = [
        "## Attack study",
        "",
        "ASR over the initially correct samples (thesis eq. 4.15); norms are medians over successful "
        "samples, in [0, 1] pixel units; p(true)/p(adv): mean softmax probability of the true and the "
        "adversarial class after success (Amirian Table 1). n correct is each attack's sample size.",
        "",
        table(ATTACK_HEADER, attack_rows(results)),
    ]
    failed = {label: cell for label, cell in attacks.items() if cell["status"] != "done"}
    if failed:
        lines += ["", "Failed attacks:", ""] + [
            f"- {label}: {cell['error']}" for label, cell in failed.items()
        ]
    equal = results.get("equal_asr")
    if equal and equal.get("asr") is not None:
        lines += [
            "",
            f"### At equal ASR ({fmt(equal['asr'])}, the highest all compared attacks reach; Table 5.1)",
            "",
            "Mean norm of each attack's n cheapest successes that make up this ASR"
            + (f"; not compared: {', '.join(equal['excluded'])}." if equal["excluded"] else "."),
            "",
            table(
                ("attack", "n", "L1", "L2", "Linf"),
                [
                    [label, row.get("n"), row["L1"], row["L2"], row["Linf"]]
                    for label, row in equal["rows"].items()
                ],
            ),
        ]
    lines += _attack_figures(attacks, run)
    return "\n".join(lines)


def _attack_figures(attacks: dict[str, Any], run: RunDirectory) -> list[str]:
    done = {label: cell for label, cell in attacks.items() if cell["status"] == "done"}
    curves = {label: cell["curve"] for label, cell in done.items() if cell.get("curve")}
    lines = []
    if curves:
        lines += ["", "### Per iteration (thesis Figs. 4.6-4.10)", ""]
        for norm in ("L1", "L2", "Linf"):
            path = figures.plot_attack_curves(
                curves, run.figures / f"curves-{norm}.png", norm=norm, title=f"{norm} per iteration"
            )
            lines.append(f"![{norm} per iteration](figures/{path.name})")
    if done:
        arrays = {label: run.load_arrays("attack", label) for label in done}
        norms = {label: a["norm_L1"][a["successful"]].tolist() for label, a in arrays.items()}
        path = figures.plot_norm_distributions(norms, run.figures / "norms-L1.png", norm="L1")
        lines += [
            "",
            "### L1 of the successful perturbations",
            "",
            f"![L1 distributions](figures/{path.name})",
        ]
        lines += _examples(arrays, run)
    return lines


def _examples(arrays: dict[str, Any], run: RunDirectory) -> list[str]:
    """A grid of the first few samples per attack: original, perturbation, adversarial, true -> new class."""
    sample = run.load_arrays("sample", "sample")
    n = min(EXAMPLES, *(len(a["x_adv"]) for a in arrays.values()))
    original = sample["x"][:n]
    y = sample["y"][:n]
    labels = {
        label: [f"{true} -> {new}" for true, new in zip(y, a["adversarial_prediction"][:n], strict=True)]
        for label, a in arrays.items()
    }
    adversarial = {label: a["x_adv"][:n] for label, a in arrays.items()}
    path = figures.plot_examples(original, adversarial, run.figures / "examples.png", n=n, labels=labels)
    return ["", "### Examples: original, perturbation, adversarial", "", f"![examples](figures/{path.name})"]


def _detector_section(results: dict[str, Any], run: RunDirectory) -> str:
    detectors = results.get("detectors") or {}
    if not detectors:
        return ""
    lines = [
        "## Detector study",
        "",
        "Negatives: the initially correct clean test images; positives: each attack's successful "
        "adversarial examples (n). TPR at FPR by linear interpolation on the ROC curve; EER accuracy as "
        "Carrara Table 2; FPR/TPR at thr.: the detector's own calibrated threshold (for I-defender: ID-95 "
        'with keep 0.95, ID-99 with keep 0.99). "authentic errors": the clean images the model '
        "misclassifies, as positives.",
    ]
    for label, cell in detectors.items():
        lines += ["", f"### {label} ({cell['name']})", ""]
        if cell["status"] != "done":
            lines.append(f"Failed: {cell['error']}")
            continue
        fitted = f"Fitted on {cell['n_fit']} clean training images"
        if cell.get("n_calibration"):
            fitted += f", threshold set on {cell['n_calibration']} clean test images outside the sample"
        if cell.get("train_attack"):
            fitted = (
                f"Trained on {cell['n_fit']} clean training images and their {cell['train_attack']} examples"
            )
        lines.append(f"{fitted}; clean false-positive rate on the test sample: {fmt(cell['clean_fpr'])}.")
        lines += [
            "",
            table(DETECTOR_HEADER, [_detector_row(name, row) for name, row in cell["rows"].items()]),
        ]
        rocs = {
            name: {"fpr": row["roc"]["fpr"], "tpr": row["roc"]["tpr"], "auc": row["auc"]}
            for name, row in cell["rows"].items()
            if row.get("roc") and name != "authentic errors"
        }
        if rocs:
            path = figures.plot_roc(
                rocs, run.figures / f"roc-{run.cell_path('detector', label).stem}.png", title=label
            )
            lines += ["", f"![ROC {label}](figures/{path.name})"]
    adaptive = adaptive_section(results, run)
    return "\n".join(lines + (["", adaptive] if adaptive else []))


DETECTOR_HEADER = (
    "against",
    "n",
    "AUC",
    "TPR@1%",
    "TPR@5%",
    "TPR@10%",
    "EER acc.",
    "FPR at thr.",
    "TPR at thr.",
)


def _detector_row(name: str, row: dict[str, Any]) -> list[object]:
    if "auc" not in row:
        return [name, row["n"], *([None] * 7)]
    tpr = row["tpr_at_fpr"]
    return [
        name,
        row["n"],
        row["auc"],
        tpr["0.01"],
        tpr["0.05"],
        tpr["0.1"],
        row["eer_accuracy"],
        row["threshold_fpr"],
        row["threshold_tpr"],
    ]


def failed_lines(cells: dict[str, Any]) -> list[str]:
    """A section's "Failed:" block, one line per failed cell (its label and error); [] when none failed."""
    failed = [f"- {label}: {cell['error']}" for label, cell in cells.items() if cell["status"] != "done"]
    return ["", "Failed:", "", *failed] if failed else []


def _mean_median(number: dict[str, Any]) -> str:
    return "n/a" if number["mean"] is None else f"{fmt(number['mean'])} ({fmt(number['median'])})"


def _heatmap_section(results: dict[str, Any], run: RunDirectory) -> str:
    """Seed 001 Fig. 3 per attack: the numbers' table and a figure of a few samples each."""
    cells = results.get("heatmaps") or {}
    if not cells:
        return ""
    done = {label: cell for label, cell in cells.items() if cell["status"] == "done"}
    said = next(iter(done.values()), {"composite": "n/a", "k": "n/a"})
    lines = [
        "## Explanation heatmaps, clean vs adversarial (seed 001 Fig. 3; thesis A.1)",
        "",
        f"LRP heatmaps (composite {said['composite']}) of each attack's successful samples, mean (median) "
        "over n. Spearman: rank correlation of the clean and the adversarial heatmap for the original "
        "class (1: the explanation survived, below 0: reversed); top-k overlap: share of the clean "
        f"heatmap's k = {said['k']} most relevant values still among the adversarial heatmap's; on "
        "perturbed: share of the adversarial heatmap's |relevance| (adversarial class) that lies on the "
        "values the attack changed, beside the share of values it changed (what a heatmap blind to the "
        "perturbation would give).",
    ]
    if done:
        rows = [
            [label, cell["n"], *(_mean_median(cell["numbers"][name]) for name in NUMBERS)]
            for label, cell in done.items()
        ]
        header = ("attack", "n", "Spearman", "top-k overlap", "R on perturbed", "values perturbed")
        lines += ["", table(header, rows)]
    lines += failed_lines(cells)
    for label, cell in done.items():
        if not cell["n"]:
            continue
        arrays = run.load_arrays("heatmap", label)
        path = plot_heatmaps(
            arrays["example_x"],
            arrays["example_x_adv"],
            example_heatmaps(arrays),
            [str(title) for title in arrays["example_titles"]],
            run.figures / f"{run.cell_path('heatmap', label).stem}.png",
        )
        lines += ["", f"### {label}", "", f"![heatmaps {label}](figures/{path.name})"]
    return "\n".join(lines)


def _signature_section(results: dict[str, Any], run: RunDirectory) -> str:
    """Seed 001 Figs. 4-6: the separability table, the embedding by class and per class vs each attack."""
    cells = results.get("signatures") or {}
    embeddings = results.get("embeddings") or {}
    if not cells and not embeddings:
        return ""
    done = {label: cell for label, cell in cells.items() if cell["status"] == "done"}
    lines = ["## LRP signatures and UMAP (seed 001 Figs. 4-6)", ""]
    if done:
        first = next(iter(done.values()))
        lines += [
            f"A signature: the LRP relevance of the input of the last layer ('{first['layer']}', width "
            f"{first['width']}) for the predicted class, of the first clean, correctly classified samples of "
            "each class and of each attack's successful adversarial examples of the same samples. AUC: "
            "cross-validated (5 folds) logistic regression telling adversarial from clean signatures, "
            "beside the same on the hidden state (the layer's input without relevance); 0.5 is chance.",
            "",
            table(
                ("attack", "n clean", "n adversarial", "AUC signatures", "AUC hidden state"),
                [
                    [
                        label,
                        cell["n_clean"],
                        cell["n_adversarial"],
                        cell["auc"]["signature"],
                        cell["auc"]["hidden"],
                    ]
                    for label, cell in done.items()
                ],
            ),
        ]
        reasons = [
            f"- {label}: {next(iter(cell['undefined'].values()))}"
            for label, cell in done.items()
            if cell["undefined"]
        ]
        if reasons:
            lines += ["", "n/a:", "", *reasons]
    lines += failed_lines({**cells, **embeddings})
    for label, cell in embeddings.items():
        if cell["status"] == "done":
            lines += _embedding_figures(label, cell, run)
    return "\n".join(lines)


def _embedding_figures(label: str, cell: dict[str, Any], run: RunDirectory) -> list[str]:
    arrays = run.load_arrays("embedding", label)
    points, group, original = arrays["embedding"], arrays["group"], arrays["original_class"]
    names = dict(zip(cell["classes"], cell["class_names"], strict=True))
    clean = group == -1
    path = figures.plot_embedding_by_class(
        points[clean], original[clean], names, run.figures / "signatures-by-class.png"
    )
    lines = [
        "",
        f"### UMAP of the clean signatures by class (Fig. 4; seed {cell['seed']}, "
        f"{cell['n_neighbors']} neighbours)",
        "",
        f"![clean signatures by class](figures/{path.name})",
    ]
    attacks = {name: (points[group == i], original[group == i]) for i, name in enumerate(cell["attacks"])}
    if not attacks:
        return lines
    lines += ["", "### Per class, clean vs each attack's adversarial examples (Figs. 5-6)"]
    for shown in cell["shown_classes"]:
        path = figures.plot_embedding_attacks(
            points[clean],
            original[clean],
            attacks,
            shown,
            run.figures / f"signatures-class-{shown}.png",
            name=names[shown],
        )
        lines += ["", f"![class {names[shown]}](figures/{path.name})"]
    return lines
