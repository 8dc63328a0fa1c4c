"""One evaluation run: the attack study and the detector study of a :class:`RunConfig`, resumable.

``run_evaluation(config)`` prepares the output folder (refusing one it cannot write before any work),
loads the data and the model, takes the fixed sample (the first ``samples`` test images), then runs each
cell (an attack, a detector) unless a finished cell with the same key is on disk. ``results.json`` is
rewritten after every cell with ``complete: false``, finally with ``complete: true`` when no cell failed,
then the report is rendered. A cell that raises fails alone: the others finish, ``failed_cells`` lists it
and a rerun retries it. Ctrl-C raises :class:`RunInterrupted`, which says how many cells are saved. The
same config and seed give the same ``results.json`` on CPU, timings aside.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from xaiadv.plugins.checks import looks_like_probabilities

from . import attack_study, detector_study
from .config import RunConfig
from .data import Dataset, DatasetNotFoundError, load_dataset, training_subset
from .models import TrainConfig, import_factory, load_or_train
from .report import render_report
from .rundir import SCHEMA_VERSION, RunDirectory, key_of, to_json

logger = logging.getLogger(__name__)

PACKAGES = (
    "xaiadv",
    "torch",
    "zennit",
    "numpy",
    "scikit-learn",
    "adversarial-robustness-toolbox",
    "foolbox",
    "torchattacks",
)


@dataclass(frozen=True)
class RunResult:
    """Where the run wrote, and what it found (``results`` is the content of results.json)."""

    directory: Path
    results: dict[str, Any]

    @property
    def report(self) -> Path:
        return self.directory / "report.md"

    @property
    def failed_cells(self) -> list[dict[str, str]]:
        """The cells that raised: kind, label and error of each (empty when the run is complete)."""
        return self.results["failed_cells"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the cells finished so far are saved in ``directory``; a rerun resumes.

    A KeyboardInterrupt still (a caller's ``except KeyboardInterrupt`` sees it), with the count to say.
    """

    def __init__(self, finished: int, total: int, directory: Path) -> None:
        super().__init__(
            f"interrupted; {finished} of {total} cells finished and are saved in {directory}; "
            "rerun the same command to resume"
        )
        self.finished, self.total, self.directory = finished, total, directory


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    description: dict[str, Any]
    digest: str


def run_evaluation(config: RunConfig, *, progress: bool = False) -> RunResult:
    """Run (or resume) the studies of ``config`` and render the report; returns the run's results.

    Raises :class:`RunInterrupted` on Ctrl-C (KeyboardInterrupt), after the finished cells are saved.
    """
    device = _device(config.device)
    run_dir = RunDirectory(config.output)
    run_dir.prepare()
    results: dict[str, Any] = {"attacks": {}, "detectors": {}}
    try:
        return _run_studies(config, device, run_dir, results, progress)
    except KeyboardInterrupt as interrupt:
        raise RunInterrupted(_finished_cells(results), _cell_count(config), run_dir.root) from interrupt


def _cell_count(config: RunConfig) -> int:
    """Attack cells always run (the detectors score their examples); detector cells with their study."""
    detectors = len(config.detectors) if "xaiadv:DetectorStudy" in config.studies else 0
    return len(config.attacks) + detectors


def _finished_cells(results: dict[str, Any]) -> int:
    cells = [*results["attacks"].values(), *results["detectors"].values()]
    return sum(cell["status"] == "done" for cell in cells)


def _failed_cells(results: dict[str, Any]) -> list[dict[str, str]]:
    """Kind, label and error of every cell that raised, attacks first, in the config's order."""
    cells = [*results["attacks"].values(), *results["detectors"].values()]
    return [
        {"kind": cell["kind"], "label": cell["label"], "error": cell["error"]}
        for cell in cells
        if cell["status"] == "failed"
    ]


def _run_studies(
    config: RunConfig, device: torch.device, run_dir: RunDirectory, results: dict[str, Any], progress: bool
) -> RunResult:
    run_dir.write_json(run_dir.root / "config.json", config.to_dict())
    data, fell_back = _dataset(config)
    loaded = load_model(config, data, device)
    model = loaded.model
    sample = _sample(model, data, config, device)
    base_key = key_of(
        config.dataset, data.name, config.samples, config.seed, loaded.digest, config.batch_size
    )
    results.update(
        {
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "config": config.to_dict(),
            "environment": environment(config, device),
            "data": {
                "dataset": data.name,
                "fell_back": fell_back,
                "n": len(sample.y),
                "n_correct": int(sample.initially_correct.sum()),
            },
            "model": loaded.description,
            "checks": _checks(model, sample, config.batch_size, device),
            "attacks": {},
            "detectors": {},
            "failed_cells": [],
        }
    )
    run_dir.write_json(run_dir.results, results)
    run_dir.write_json(run_dir.root / "environment.json", results["environment"])
    run_dir.save_arrays(
        "sample", "sample", {"x": sample.x.numpy(), "y": sample.y.numpy(), "prediction": sample.prediction}
    )
    attacks = _attack_cells(config, model, sample, run_dir, base_key, device, progress, results)
    if "xaiadv:AttackStudy" in config.studies:
        arrays = {
            label: run_dir.load_arrays("attack", label)
            for label, cell in attacks.items()
            if cell["status"] == "done"
        }
        results["equal_asr"] = attack_study.equal_asr_table(attacks, arrays, config.equal_asr)
        results["warnings"] = results["checks"]["warnings"] + attack_study.attack_warnings(attacks)
    if "xaiadv:DetectorStudy" in config.studies and config.detectors:
        _detector_cells(config, model, data, sample, run_dir, base_key, attacks, device, progress, results)
    results["failed_cells"] = _failed_cells(results)
    results["complete"] = not results["failed_cells"]
    run_dir.write_json(run_dir.results, results)
    render_report(run_dir.root)
    return RunResult(run_dir.root, to_json(results))


def _attack_cells(
    config: RunConfig,
    model: nn.Module,
    sample: attack_study.Sample,
    run_dir: RunDirectory,
    base_key: str,
    device: torch.device,
    progress: bool,
    results: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Each attack's cell, reused when finished with the same key; an attack that raises is recorded."""
    cells: dict[str, dict[str, Any]] = {}
    for spec in tqdm(config.attacks, desc="attacks", disable=not progress):
        key = key_of(base_key, dataclasses.asdict(spec))
        cell = run_dir.finished_cell("attack", spec.label, key)
        if cell is None:
            logger.info("attack %s (%s)", spec.label, spec.name)
            _seed(config.seed)
            try:
                cell, arrays = attack_study.run_attack_cell(
                    spec, model, sample, batch_size=config.batch_size, device=device, progress=progress
                )
                run_dir.save_cell("attack", spec.label, {**cell, "key": key}, arrays)
            except Exception as error:  # an attack that raises fails its cell, not the run
                logger.warning("attack %s failed: %s", spec.label, error)
                cell = attack_study.failed_cell(spec, error)
        else:
            logger.info("attack %s: reusing the finished cell", spec.label)
        cells[spec.label] = {**_public(cell), "key": key}
        results["attacks"][spec.label] = _public(cell)
        run_dir.write_json(run_dir.results, results)
    return cells


def _public(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell as results.json shows it: without its bookkeeping (resume key, arrays flag)."""
    return {k: v for k, v in cell.items() if k not in ("key", "arrays")}


def _detector_cells(
    config: RunConfig,
    model: nn.Module,
    data: Dataset,
    sample: attack_study.Sample,
    run_dir: RunDirectory,
    base_key: str,
    attacks: dict[str, dict[str, Any]],
    device: torch.device,
    progress: bool,
    results: dict[str, Any],
) -> None:
    """Fit each detector on the training split and score the clean sample and every attack's successes."""
    done = [label for label, cell in attacks.items() if cell["status"] == "done"]
    fit = training_subset(data, config.fit_samples, config.seed)
    x_fit, y_fit = fit.x_train, fit.y_train
    x_calibration = data.x_test[config.samples : config.samples + config.calibration_samples]
    n_classes = len(data.classes)
    for spec in tqdm(config.detectors, desc="detectors", disable=not progress):
        key = key_of(
            base_key,
            dataclasses.asdict(spec),
            config.fit_samples,
            len(x_calibration),
            {a: attacks[a]["key"] for a in done},
        )
        cell = run_dir.finished_cell("detector", spec.label, key)
        if cell is None:
            logger.info("detector %s (%s)", spec.label, spec.name)
            _seed(config.seed)
            try:
                cell, arrays = _detector_cell(
                    spec,
                    model,
                    (x_fit, y_fit, x_calibration),
                    n_classes,
                    sample,
                    run_dir,
                    done,
                    config,
                    device,
                )
                run_dir.save_cell("detector", spec.label, {**cell, "key": key}, arrays)
            except Exception as error:  # a detector that raises fails its cell, not the run
                logger.warning("detector %s failed: %s", spec.label, error)
                cell = {
                    "kind": "detector",
                    "label": spec.label,
                    "name": spec.name,
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}",
                }
        results["detectors"][spec.label] = _public(cell)
        run_dir.write_json(run_dir.results, results)


def _detector_cell(
    spec: Any,
    model: nn.Module,
    clean: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_classes: int,
    sample: attack_study.Sample,
    run_dir: RunDirectory,
    attack_labels: list[str],
    config: RunConfig,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    x_fit, y_fit, x_calibration = clean
    detect = detector_study.fit_detector(
        spec,
        model,
        x_fit,
        y_fit,
        x_calibration=x_calibration if len(x_calibration) else None,
        n_classes=n_classes,
        batch_size=config.batch_size,
        device=device,
        seed=config.seed,
    )
    correct = sample.initially_correct
    clean_scores, clean_flags = detect(sample.x.numpy())
    rows = {
        "authentic errors": detector_study.separation(
            clean_scores[correct], clean_scores[~correct], clean_flags[correct], clean_flags[~correct]
        )
    }
    arrays = {"clean_scores": clean_scores}
    for label in attack_labels:
        attack_arrays = run_dir.load_arrays("attack", label)
        successful = attack_arrays["successful"]
        n = len(successful)  # an attack capped at fewer samples is compared with its own clean rows
        scores, flags = (
            detect(attack_arrays["x_adv"][successful])
            if successful.any()
            else (np.zeros(0), np.zeros(0, bool))
        )
        rows[label] = detector_study.separation(
            clean_scores[:n][correct[:n]], scores, clean_flags[:n][correct[:n]], flags
        )
        arrays[f"scores_{run_dir.cell_path('attack', label).stem}"] = scores
    cell = {
        "kind": "detector",
        "label": spec.label,
        "name": spec.name,
        "params": dict(spec.params),
        "train_attack": spec.train_attack,
        "status": "done",
        "n_fit": min(spec.train_samples, len(x_fit)) if spec.train_attack else len(x_fit),
        "n_calibration": None if spec.train_attack else len(x_calibration),
        "clean_fpr": float(clean_flags[correct].mean()) if correct.any() else None,
        "rows": rows,
    }
    return cell, arrays


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA GPU here; use device = 'cpu'")
    return torch.device(name)


def _seed(seed: int) -> None:
    """Every cell starts from the same seed, so a cell's result does not depend on which cells ran before."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # ART's attacks draw from numpy's global generator


def _dataset(config: RunConfig) -> tuple[Dataset, bool]:
    try:
        return load_dataset(config.dataset), False
    except DatasetNotFoundError as error:
        if config.fallback is None:
            raise
        logger.warning("%s; falling back to %s", error, config.fallback)
        return load_dataset(config.fallback), True


def load_model(config: RunConfig, data: Dataset, device: torch.device) -> LoadedModel:
    """The cached reference CNN for the data set, or the user's checkpoint in its factory's module."""
    spec = config.model
    if spec.checkpoint is None:
        train = TrainConfig(
            dataset=data.name, epochs=spec.epochs, max_train=spec.max_train, width=spec.width, seed=spec.seed
        )
        trained = load_or_train(train, device=device)
        model = trained.model
        description = {"kind": "reference", "train": train.to_dict(), "test_accuracy": trained.test_accuracy}
    else:
        try:
            factory = import_factory(spec.factory, Path(config.folder))
        except ValueError as error:
            raise ValueError(f"model.factory: {error}") from error
        model = factory(**spec.factory_kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model.factory: {spec.factory!r} returned {type(model).__name__}, not a torch module"
            )
        try:
            model.load_state_dict(safetensors.torch.load_file(spec.checkpoint))
        except (OSError, RuntimeError, ValueError) as error:
            raise ValueError(
                f"model.checkpoint: cannot load {spec.checkpoint!r} into {spec.factory} ({error})"
            ) from error
        description = {"kind": "checkpoint", "checkpoint": spec.checkpoint, "factory": spec.factory}
    model = model.to(device).eval()
    digest = hashlib.sha256(
        safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    ).hexdigest()[:16]
    return LoadedModel(model, {**description, "sha256": digest}, digest)


def _sample(model: nn.Module, data: Dataset, config: RunConfig, device: torch.device) -> attack_study.Sample:
    x = torch.as_tensor(data.x_test[: config.samples])
    y = torch.as_tensor(data.y_test[: config.samples])
    logits = attack_study.predict(model, x, config.batch_size, device)
    return attack_study.Sample(x, y, logits.argmax(1), attack_study.softmax(logits))


def _checks(
    model: nn.Module, sample: attack_study.Sample, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """The clean sample's zero-gradient share (thesis Table 4.2); whether the model outputs probabilities."""
    share = attack_study.zero_gradient_share(model, sample, batch_size, device)
    logits = attack_study.predict(model, sample.x[:batch_size], batch_size, device)
    probabilities = looks_like_probabilities(torch.from_numpy(logits))
    warnings = []
    if share is not None and share > 0.05:
        warnings.append(
            f"{share:.1%} of the initially correct samples have an all-zero loss gradient (thesis Table "
            "4.2): gradient attacks cannot move them; LRP-grad+mean and IFGSM with noise are meant for this"
        )
    if probabilities:
        warnings.append("the model outputs probabilities, not logits: gradients through a softmax saturate")
    return {"zero_gradient_share": share, "outputs_probabilities": probabilities, "warnings": warnings}


def environment(config: RunConfig, device: torch.device) -> dict[str, Any]:
    """Package versions, Python, platform, device, seed and git revision (None outside a checkout)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return to_json(
        {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "device": str(device),
            "seed": config.seed,
            "packages": versions,
            "git_revision": _git_revision(),
        }
    )


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
