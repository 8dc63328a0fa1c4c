"""The run grid on Ray: same results as the local executor, resume, retried workers, failed cells, and the
errors said before any work (Ray missing, a bad address, a factory the workers cannot import)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from xaiadv.evaluation import executor as executor_module
from xaiadv.evaluation.cli import main
from xaiadv.evaluation.config import ConfigError, ExecutorSpec, RunConfig, load_config
from xaiadv.evaluation.detector_study import CleanSplits
from xaiadv.evaluation.run import Run, RunInterrupted, run_evaluation
from xaiadv.evaluation.rundir import RunDirectory
from xaiadv.evaluation.studies import Study, studies

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'xaiadv[ray]'")

QUICK = Path(__file__).parents[2] / "evaluation" / "quick.toml"
TINY = """
seed = 0
batch_size = 64

[data]
dataset = "digits"
samples = 40
fit_samples = 300

[model]
epochs = 3
max_train = 600

[[attacks]]
name = "torchattacks:PGD"
label = "PGD"
params = { eps = 0.25, alpha = 0.05, steps = 5, random_start = false }

[[attacks]]
name = "xaiadv:LRPGrad"
label = "LRP-grad"
params = { eps = 0.05, max_iter = 5 }

[[detectors]]
name = "xaiadv:KNNDetector"
label = "kNN"
params = { k = 5 }
"""


@pytest.fixture(scope="module")
def local_ray(cache: Path) -> Iterator[None]:
    """The test's own local Ray instance (2 CPUs), shut down after; the model cache is the module's."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test study's cells
    yield
    ray.shutdown()


def tiny(folder: Path, output: str, body: str = TINY) -> RunConfig:
    path = folder / "run.toml"
    path.write_text(f'output = "{folder / output}"\n' + body, encoding="utf-8")
    return load_config(path)


def on_ray(config: RunConfig, output: Path, **spec: Any) -> RunConfig:
    return dataclasses.replace(config, output=str(output), executor=ExecutorSpec(kind="ray", **spec))


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """results.json minus what may differ between executors: timings, the environment, the output folder."""
    results = json.loads(json.dumps(results))
    results.pop("environment")
    results["config"].pop("output")
    for cell in results["attacks"].values():
        cell.pop("seconds_per_image", None)
    return results


def computed(result_dir: Path) -> set[str]:
    """The cells this run computed (environment.json names the node of each), not those it reused."""
    environment = json.loads((result_dir / "environment.json").read_text())
    return set(environment["executor"]["cells"])


# -------------------------------------------------------------------------------------------------
# errors before any work (no Ray instance needed)


def test_ray_missing_is_an_import_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'xaiadv\[ray\]'"):
        executor_module.open_executor(ExecutorSpec(kind="ray"))


def test_an_unreachable_address_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"executor.address: no Ray cluster answers at '127.0.0.1:1'"):
        executor_module.open_executor(ExecutorSpec(kind="ray", address="127.0.0.1:1"))


def test_the_cli_s_address_alone_means_ray_and_an_unreachable_one_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny(tmp_path, "cli")  # kind = "local" in the file: --address overrides it with Ray
    assert main(["run", str(tmp_path / "run.toml"), "--address", "127.0.0.1:1"]) == 2
    assert "executor.address: no Ray cluster answers at '127.0.0.1:1'" in capsys.readouterr().err
    assert not list((tmp_path / "cli").glob("cells/*"))  # refused before any cell


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ('kind = "ray"\naddress = "nowhere"', r"executor.address: expected 'auto', 'host:port'"),
        ('kind = "local"\naddress = "auto"', r"executor.address: only kind = 'ray' joins a cluster"),
        ('kind = "dask"', r"executor.kind"),
        ('kind = "ray"\nnum_gpus = -1', r"executor.num_gpus: expected a finite number >= 0"),
        ('kind = "ray"\nnum_cpus = 0', r"executor.num_cpus: a cell needs some CPU or GPU"),
        ('kind = "ray"\nthreads = 2', r"unknown key\(s\) executor.threads"),
    ],
)
def test_bad_executor_tables_name_the_key(tmp_path: Path, table: str, match: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(f'output = "{tmp_path}"\n{TINY}\n[executor]\n{table}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_config(path)


# -------------------------------------------------------------------------------------------------
# runs on the test's Ray instance


def test_ray_gives_the_local_executor_s_results(local_ray: None, tmp_path: Path) -> None:
    config = tiny(tmp_path, "local")
    local = run_evaluation(config)
    remote = run_evaluation(on_ray(config, tmp_path / "ray"), progress=True)  # tqdm bars stay on the driver
    assert remote.results["complete"] is True
    assert figures(remote.results) == figures(local.results)
    assert list(remote.results["attacks"]) == ["PGD", "LRP-grad"]  # the config's order, not arrival's
    executor = json.loads((remote.directory / "environment.json").read_text())["executor"]
    assert executor["kind"] == "ray" and executor["cluster_resources"]["CPU"] == 2.0
    assert set(executor["cells"]) == {"attack/PGD", "attack/LRP-grad", "detector_fit/kNN", "detector/kNN"}
    assert all(node for node in executor["cells"].values())
    for name in ("attack-pgd", "detector-knn"):
        [saved] = (remote.directory / "cells").glob(f"{name}-*.json")
        [reference] = (local.directory / "cells").glob(f"{name}-*.json")
        drop = ("seconds_per_image",)
        assert {k: v for k, v in json.loads(saved.read_text()).items() if k not in drop} == {
            k: v for k, v in json.loads(reference.read_text()).items() if k not in drop
        }


def test_an_interrupted_driver_resumes_computing_only_the_rest(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = on_ray(tiny(tmp_path, "unused"), tmp_path / "ray")
    record = Run.record

    def interrupted_after_one(self: Run, task: Any, outcome: Any) -> Any:
        if self.finished_cells() >= 1:
            raise KeyboardInterrupt
        return record(self, task, outcome)

    monkeypatch.setattr(Run, "record", interrupted_after_one)
    with pytest.raises(RunInterrupted, match="1 of 4 cells finished"):
        run_evaluation(config)
    first = computed(tmp_path / "ray")
    assert len(first) == 1 and first < {"attack/PGD", "attack/LRP-grad"}
    monkeypatch.setattr(Run, "record", record)
    result = run_evaluation(config)
    assert result.results["complete"] is True
    assert (
        computed(result.directory)
        == {"attack/PGD", "attack/LRP-grad", "detector_fit/kNN", "detector/kNN"} - first
    )


@dataclass(frozen=True)
class FlakyStudy(Study):
    """Two cells: one whose worker process dies on the first try, one that raises."""

    marker: str = ""

    def cell_count(self, config: RunConfig) -> int:
        return 2

    def run(self, run: Run) -> None:
        died = run.cell(
            "flaky", "dies once", run.key("dies", self.marker), functools.partial(_dies_once, self)
        )
        run.cell("flaky", "raises", run.key("raises"), _raises, about={"name": "test:Flaky"})
        assert died["status"] == "done"  # reading a pending cell waits for it


def _dies_once(study: FlakyStudy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    marker = Path(study.marker)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)  # the worker process dies: Ray retries the task on a fresh one
    return {"kind": "flaky", "label": "dies once", "status": "done", "pid": os.getpid()}, {"x": np.ones(3)}


def _raises() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    raise ValueError("this cell cannot be computed")


@pytest.fixture
def flaky() -> Iterator[type[FlakyStudy]]:
    studies.register("test:Flaky")(FlakyStudy)
    yield FlakyStudy
    studies._entries.pop("test:Flaky")


def test_a_killed_worker_is_retried_and_a_raising_cell_fails_alone(
    local_ray: None, tmp_path: Path, flaky: type[FlakyStudy]
) -> None:
    marker = tmp_path / "died"
    config = dataclasses.replace(
        on_ray(tiny(tmp_path, "unused"), tmp_path / "ray"), studies=(flaky(marker=str(marker)),)
    )
    result = run_evaluation(config)
    cells = result.results["flakys"]
    assert marker.exists() and cells["dies once"]["status"] == "done"
    assert cells["dies once"]["pid"] != int(marker.read_text())  # computed again by another process
    assert cells["raises"] == {
        "kind": "flaky",
        "label": "raises",
        "name": "test:Flaky",
        "status": "failed",
        "error": "ValueError: this cell cannot be computed",
    }
    assert result.failed_cells == [
        {"kind": "flaky", "label": "raises", "error": "ValueError: this cell cannot be computed"}
    ]
    assert result.results["complete"] is False
    assert set(result.results["attacks"]) == {"PGD", "LRP-grad"}


def test_a_factory_the_workers_cannot_import_is_an_error_before_any_cell(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver_only = tmp_path / "driver_only"
    driver_only.mkdir()
    (driver_only / "driver_only_nets.py").write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    (tmp_path / "mynets.py").write_text("from driver_only_nets import build  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(driver_only))  # the driver's sys.path only: workers do not see it
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    safetensors.torch.save_file(net.state_dict(), tmp_path / "net.safetensors")
    body = TINY.split("[[detectors]]")[0].replace(
        "[model]\nepochs = 3\nmax_train = 600\n",
        '[model]\ncheckpoint = "net.safetensors"\nfactory = "mynets:build"\n',
    )
    config = on_ray(tiny(tmp_path, "unused", body), tmp_path / "ray")
    with pytest.raises(
        ValueError, match=r"model.factory 'mynets:build' cannot be loaded on the workers"
    ) as err:
        run_evaluation(config)
    assert "driver_only_nets" in str(err.value) and "py_modules" in str(err.value)
    assert list((tmp_path / "ray" / "cells").iterdir()) == []  # no cell ran


def test_the_cli_s_executor_flag_overrides_the_config_s_both_ways(
    local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny(tmp_path, "ray")  # [executor] left out: kind = "local"
    assert config.executor.kind == "local"
    assert main(["run", str(tmp_path / "run.toml"), "--executor", "ray"]) == 0
    executor = json.loads((tmp_path / "ray" / "environment.json").read_text())["executor"]
    assert executor["kind"] == "ray" and executor["cluster_resources"]["CPU"] == 2.0  # the test's Ray
    assert set(executor["cells"]) == {"attack/PGD", "attack/LRP-grad", "detector_fit/kNN", "detector/kNN"}
    # a config that asks for an unreachable cluster runs locally with --executor local (no address kept)
    path = tmp_path / "run.toml"
    path.write_text(
        path.read_text().replace('/ray"', '/local"') + '\n[executor]\nkind = "ray"\naddress = "127.0.0.1:1"\n'
    )
    assert load_config(path).executor.address == "127.0.0.1:1"
    assert main(["run", str(path), "--executor", "local"]) == 0
    executor = json.loads((tmp_path / "local" / "environment.json").read_text())["executor"]
    assert executor["kind"] == "local" and "cluster_resources" not in executor
    assert set(executor["cells"]) == {"attack/PGD", "attack/LRP-grad", "detector_fit/kNN", "detector/kNN"}
    assert "report:" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_toml_on_ray_equals_local(local_ray: None, tmp_path: Path) -> None:
    config = load_config(QUICK, overrides={"output": str(tmp_path / "local")})
    local = run_evaluation(config)
    remote = run_evaluation(on_ray(config, tmp_path / "ray"))
    assert remote.results["complete"] is True and local.results["complete"] is True
    assert figures(remote.results) == figures(local.results)


class _ShippingExecutor(executor_module.LocalExecutor):
    """Pickles each cell's closure as a Ray task carries it (cloudpickle, the run reduced to a stub, as
    RayExecutor reduces it to its small state) and measures it, then computes the cell here."""

    def __init__(self) -> None:
        self.shipped: dict[tuple[str, str], int] = {}

    def reduce_run(self, run: Run) -> tuple[Any, ...]:
        return str, ("the run's small state",)

    def submit(self, run: Run, task: executor_module.CellTask) -> Any:
        self.shipped[(task.kind, task.label)] = len(ray.cloudpickle.dumps(task.compute))
        return super().submit(run, task)


def test_a_detector_task_carries_no_fitting_images(cache: Path, tmp_path: Path) -> None:
    """The detector cells (the fit, the adaptive column) rebuild their clean splits from the run where they
    run: their closures stay far below the fitting images' bytes, which reach a worker once, with the run."""
    adaptive = (
        '[[studies]]\nname = "xaiadv:DetectorStudy"\n'
        "adaptive = { eps = [0.1], samples = 4, max_iter = 2, search_steps = 1, unbounded = false }\n"
    )
    config = tiny(tmp_path, "out", TINY + adaptive)
    shipping = _ShippingExecutor()
    directory = RunDirectory(config.output)
    directory.prepare()
    run = Run.start(config, torch.device("cpu"), directory, executor=shipping)
    run.execute()
    fit_images = CleanSplits.of(run).x_fit.nbytes
    assert fit_images == 300 * 64 * 4  # digits' 8x8 float32 images, fit_samples = 300
    detector_tasks = {
        cell: size for cell, size in shipping.shipped.items() if cell[0] in ("detector", "adaptive")
    }
    assert set(detector_tasks) == {("detector", "kNN"), ("adaptive", "kNN | Linf 0.1")}, detector_tasks
    assert all(size < fit_images / 4 for size in detector_tasks.values()), (detector_tasks, fit_images)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [cell["status"] for cell in results["detectors"].values()] == ["done"]
