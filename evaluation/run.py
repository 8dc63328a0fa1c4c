"""One evaluation run: the attack cells of a :class:`RunConfig`, then its studies, resumable cell by cell.

``run_evaluation(config)`` prepares the output folder (refusing one it cannot write before any work),
loads the data and the model, takes the fixed sample (the first ``samples`` test images) and builds a
:class:`Run`: the context every cell reads. Each attack is one cell; then each study of the config runs
over the finished attack cells and may add cells of its own (one per detector in the detector study).
Every cell goes through :meth:`Run.cell`, the one skeleton: a finished cell with the same key on disk is
reused, a cell that raises fails alone (``failed_cells`` lists it and a rerun retries it), a finished one
is saved atomically, and ``results.json`` is rewritten after each cell with ``complete: false``, finally
with ``complete: true`` when no cell failed, then the report is rendered. Ctrl-C raises
:class:`RunInterrupted`, which says how many cells are saved. The same config and seed give the same
``results.json`` on CPU, timings aside, with either executor.

Where a cell is computed is the executor's business (``[executor]``, :mod:`.executor`): at once, here
(local), or as a Ray task whose outcome :meth:`Run.record` saves on arrival. The run waits for every
cell after the attack cells and after each study (:meth:`~.executor.Executor.barrier`), since later
studies read earlier cells.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from xaiadv.plugins.checks import looks_like_probabilities

from . import attack_study
from .config import AttackSpec, RunConfig
from .data import Dataset, DatasetNotFoundError, load_dataset
from .executor import CellTask, Compute, Executor, LocalExecutor, Outcome, open_executor
from .models import load_run_model
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


def run_evaluation(config: RunConfig, *, progress: bool = False) -> RunResult:
    """Run (or resume) the attack cells and the studies of ``config``, render the report; the results.

    Raises :class:`RunInterrupted` on Ctrl-C (KeyboardInterrupt), after the finished cells are saved.
    """
    device = _device(config.device)
    directory = RunDirectory(config.output)
    directory.prepare()
    run: Run | None = None
    with open_executor(config.executor, progress=progress) as executor:
        try:
            run = Run.start(config, device, directory, executor=executor, progress=progress)
            return run.execute()
        except KeyboardInterrupt as interrupt:  # the executor cancels what is still running on exit
            finished = 0 if run is None else run.finished_cells()
            raise RunInterrupted(finished, cell_count(config), directory.root) from interrupt


def cell_count(config: RunConfig) -> int:
    """Attack cells always run (every study reads them); then the cells each study adds."""
    return len(config.attacks) + sum(study.cell_count(config) for study in config.studies)


@dataclass
class Run:
    """One run in progress: what every cell reads, and the results written so far.

    ``base_key``: the hash of what every cell depends on (data set, sample, seed, model weights, batch
    size); :meth:`key` extends it with what one cell depends on. ``attacks``: each attack's cell as
    results.json shows it, plus its ``key`` (the detector study keys its cells by them). ``executor``:
    where the cells are computed; a Ray executor also decides how the run is pickled for its workers.
    """

    config: RunConfig
    device: torch.device
    directory: RunDirectory
    data: Dataset
    model: nn.Module
    sample: attack_study.Sample
    results: dict[str, Any]
    base_key: str
    progress: bool = False
    executor: Executor = field(default_factory=LocalExecutor)
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=lambda: ["attack", "detector_fit", "detector"])
    order: dict[str, list[str]] = field(default_factory=dict)  # each kind's labels as the run asked

    def __reduce__(self) -> tuple[Any, ...]:
        """A cell's closure captures its run; only a Ray executor ships it (small state, not the model)."""
        return self.executor.reduce_run(self)

    @classmethod
    def start(
        cls,
        config: RunConfig,
        device: torch.device,
        directory: RunDirectory,
        *,
        executor: Executor | None = None,
        progress: bool = False,
    ) -> Run:
        """Load the data and the model, take the sample, write config, environment and the first results;
        then let the executor prepare (Ray: put the data and the model in the object store, probe nodes)."""
        executor = LocalExecutor() if executor is None else executor
        directory.write_json(directory.root / "config.json", config.to_dict())
        data, fell_back = _dataset(config)
        loaded = load_run_model(config.model, dataset=data.name, folder=Path(config.folder), device=device)
        sample = _sample(loaded.model, data, config, device)
        results: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "config": config.to_dict(),
            "environment": {**environment(config, device), "executor": {**executor.describe(), "cells": {}}},
            "data": {
                "dataset": data.name,
                "fell_back": fell_back,
                "n": len(sample.y),
                "n_correct": int(sample.initially_correct.sum()),
            },
            "model": loaded.description,
            "checks": _checks(loaded.model, sample, config.batch_size, device),
            "attacks": {},
            "detectors": {},
            "failed_cells": [],
        }
        directory.write_json(directory.results, results)
        directory.write_json(directory.root / "environment.json", results["environment"])
        directory.save_arrays(
            "sample",
            "sample",
            {"x": sample.x.numpy(), "y": sample.y.numpy(), "prediction": sample.prediction},
        )
        base_key = key_of(
            config.dataset, data.name, config.samples, config.seed, loaded.digest, config.batch_size
        )
        run = cls(
            config, device, directory, data, loaded.model, sample, results, base_key, progress, executor
        )
        executor.prepare(run)
        return run

    def key(self, *parts: object) -> str:
        """The resume key of a cell that depends on ``parts`` beside what every cell depends on."""
        return key_of(self.base_key, *parts)

    def execute(self) -> RunResult:
        """Every attack cell, then every study, each finished before the next; final results, the report."""
        for spec in tqdm(self.config.attacks, desc="attacks", disable=not self.progress):
            self.attacks[spec.label] = self._attack_cell(spec)
        self.executor.barrier(self)
        self.attacks = {label: dict(cell) for label, cell in self.attacks.items()}  # Ray: pending cells read
        for study in self.config.studies:
            study.run(self)
            self.executor.barrier(self)
        self.results["failed_cells"] = self.failed_cells()
        self.results["complete"] = not self.results["failed_cells"]
        self.directory.write_json(self.directory.results, self.results)
        render_report(self.directory.root)
        return RunResult(self.directory.root, to_json(self.results))

    def _attack_cell(self, spec: AttackSpec) -> dict[str, Any]:
        config = self.config
        return self.cell(
            "attack",
            spec.label,
            self.key(dataclasses.asdict(spec)),
            lambda: attack_study.run_attack_cell(
                spec,
                self.model,
                self.sample,
                batch_size=config.batch_size,
                device=self.device,
                progress=self.progress,
            ),
            about={"name": spec.name, "params": dict(spec.params)},
        )

    def cell(
        self, kind: str, label: str, key: str, compute: Compute, *, about: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any]:
        """One cell: reused when finished on disk with ``key``, else computed by the executor from the
        run's seed and saved atomically, or recorded as failed when ``compute`` raises (an Exception:
        Ctrl-C passes).

        ``about``: what names the cell's work (registry name, parameters), kept in a failed cell's record.
        The cell is shown in ``results[kind + "s"]`` and results.json is rewritten; returns the cell as
        shown there, plus its ``key``. With Ray the cell may still be computing: reading the returned
        mapping waits for it, so a ``compute`` may read only the cells of earlier studies and the cells
        of its own study whose returned mapping was read before it was submitted.
        """
        if kind not in self.kinds:
            self.kinds.append(kind)
        self.order.setdefault(kind, []).append(label)
        cell = self.directory.finished_cell(kind, label, key)
        if cell is not None:
            logger.info("%s %s: reusing the finished cell", kind, label)
            return self._show(kind, label, key, cell)
        logger.info("%s %s", kind, label)
        return self.executor.submit(self, CellTask(kind, label, key, compute, dict(about or {})))

    def record(self, task: CellTask, outcome: Outcome) -> dict[str, Any]:
        """Save a computed cell atomically (or record it failed), note the node that ran it; the cell."""
        kind, label, key = task.kind, task.label, task.key
        error, cell = outcome.error, outcome.record
        if cell is not None:
            try:
                self.directory.save_cell(kind, label, {**cell, "key": key}, outcome.arrays)
            except Exception as failure:  # a record that cannot be saved fails its cell, not the run
                error = f"{type(failure).__name__}: {failure}"
        if error is not None:
            logger.warning("%s %s failed: %s", kind, label, error)
            cell = {"kind": kind, "label": label, **task.about, "status": "failed", "error": error}
        self.results["environment"]["executor"]["cells"][f"{kind}/{label}"] = outcome.node
        self.directory.write_json(self.directory.root / "environment.json", self.results["environment"])
        return self._show(kind, label, key, cell)

    def _show(self, kind: str, label: str, key: str, cell: Mapping[str, Any]) -> dict[str, Any]:
        """Put ``cell`` in its table, in the order the run asked for the cells; rewrite results.json."""
        shown = {k: v for k, v in cell.items() if k not in ("key", "arrays")}  # bookkeeping left out
        table = {**self.results.get(f"{kind}s", {}), label: shown}
        self.results[f"{kind}s"] = {name: table[name] for name in self.order[kind] if name in table}
        self.directory.write_json(self.directory.results, self.results)
        self.executor.shown()
        return {**shown, "key": key}

    def _cells(self) -> list[dict[str, Any]]:
        """Every cell shown so far, kind by kind (attacks first), each in the config's order."""
        return [cell for kind in self.kinds for cell in self.results.get(f"{kind}s", {}).values()]

    def finished_cells(self) -> int:
        return sum(cell["status"] == "done" for cell in self._cells())

    def failed_cells(self) -> list[dict[str, str]]:
        """Kind, label and error of every cell that raised."""
        return [
            {"kind": cell["kind"], "label": cell["label"], "error": cell["error"]}
            for cell in self._cells()
            if cell["status"] == "failed"
        ]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA GPU here; use device = 'cpu'")
    return torch.device(name)


def _dataset(config: RunConfig) -> tuple[Dataset, bool]:
    try:
        return load_dataset(config.dataset), False
    except DatasetNotFoundError as error:
        if config.fallback is None:
            raise
        logger.warning("%s; falling back to %s", error, config.fallback)
        return load_dataset(config.fallback), True


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
