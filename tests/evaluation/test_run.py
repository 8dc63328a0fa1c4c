"""End-to-end tests of the evaluation harness on digits: a run, its report, resume, determinism, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from xaiadv.evaluation import attack_study, detector_study, run
from xaiadv.evaluation.cli import main
from xaiadv.evaluation.config import load_config
from xaiadv.evaluation.models import load_run_model
from xaiadv.evaluation.report import ATTACK_HEADER, render_report
from xaiadv.evaluation.run import run_evaluation
from xaiadv.evaluation.rundir import SCHEMA_VERSION, key_of, slug

STEPS = 5
CONFIG = f"""
name = "tiny digits"
seed = 0
batch_size = 64

[data]
dataset = "digits"
samples = 40
fit_samples = 400

[model]
epochs = 4
max_train = 800

[[attacks]]
name = "xaiadv:LRPGrad"
label = "LRP-grad"
params = {{ eps = 0.05, max_iter = 10 }}

[[attacks]]
name = "torchattacks:PGD"
label = "PGD (torchattacks)"
params = {{ eps = 0.25, alpha = 0.05, steps = {STEPS}, random_start = false }}

[[attacks]]
name = "foolbox:LinfPGD"
label = "PGD (Foolbox)"
params = {{ epsilons = 0.25, abs_stepsize = 0.05, steps = {STEPS}, random_start = false }}

[[detectors]]
name = "xaiadv:KNNDetector"
label = "kNN"
params = {{ k = 5 }}
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_config(folder: Path, output: Path, body: str = CONFIG) -> Path:
    path = folder / "run.toml"
    path.write_text(f'output = "{output}"\n' + body, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> run.RunResult:
    folder = tmp_path_factory.mktemp("run")
    return run_evaluation(load_config(write_config(folder, folder / "out")))


def _without_timing(results: dict[str, Any]) -> dict[str, Any]:
    """results.json minus what legitimately differs between two runs: seconds and the output folder."""
    results = json.loads(json.dumps(results))
    for cell in results["attacks"].values():
        cell.pop("seconds_per_image", None)
    results["config"].pop("output")
    return results


def test_a_run_writes_results_report_and_figures(finished: run.RunResult) -> None:
    results = json.loads((finished.directory / "results.json").read_text())
    assert results == json.loads(json.dumps(finished.results))
    assert results["complete"] is True and results["schema_version"] == SCHEMA_VERSION == 4
    environment = json.loads((finished.directory / "environment.json").read_text())
    assert environment == results["environment"] and environment["seed"] == 0
    assert environment["packages"]["torch"] and environment["device"] == "cpu"
    assert json.loads((finished.directory / "config.json").read_text())["attacks"][0]["label"] == "LRP-grad"
    assert len(np.load(finished.directory / "arrays" / f"attack-{slug('LRP-grad')}.npz")["x_adv"]) == 40
    assert set(results["attacks"]) == {"LRP-grad", "PGD (torchattacks)", "PGD (Foolbox)"}
    for cell in results["attacks"].values():
        assert cell["status"] == "done"
        assert cell["n_success"] <= cell["n_correct"] == results["data"]["n_correct"]
        assert cell["asr"] == pytest.approx(cell["n_success"] / cell["n_correct"])
        assert cell["asr"] >= 0.5, cell  # measured 0.86-0.92 on this model
        assert cell["norms"]["Linf"]["median"] <= 0.25 + 1e-6
        assert cell["undefined"] == {}  # every figure defined
    report = finished.report.read_text()
    assert report.startswith("# xaiadv evaluation report: tiny digits\n\nStatus: **complete**")
    header = "| " + " | ".join(ATTACK_HEADER) + " |"
    table = report.split(header)[1].split("\n\n")[0].strip().splitlines()[1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in table] == list(results["attacks"])
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(images) >= 6
    for image in images:
        data = (finished.directory / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_iterative_curves_are_recorded_for_foolbox_and_torchattacks(finished: run.RunResult) -> None:
    attacks = finished.results["attacks"]
    for label in ("PGD (torchattacks)", "PGD (Foolbox)"):
        curve = attacks[label]["curve"]
        # one point per iterate 0..STEPS: torchattacks' x_adv is added by end_at, Foolbox checks it itself
        assert curve["iteration"] == list(range(STEPS + 1)), label
        assert curve["asr"][0] == 0.0 and curve["asr"][-1] == pytest.approx(attacks[label]["asr"])
    lrp = attacks["LRP-grad"]["curve"]
    assert len(lrp["iteration"]) == 11 and lrp["asr"][-1] == pytest.approx(attacks["LRP-grad"]["asr"])
    assert np.all(np.diff(lrp["asr"]) >= 0)  # early stop: a success stays a success


def test_detector_rows_per_attack_and_authentic_errors(finished: run.RunResult) -> None:
    cell = finished.results["detectors"]["kNN"]
    assert cell["status"] == "done" and cell["n_fit"] == 400
    assert cell["n_calibration"] == 450 - 40  # digits' test images after the sample set the threshold
    assert set(cell["rows"]) == {"authentic errors", "LRP-grad", "PGD (torchattacks)", "PGD (Foolbox)"}
    for label, row in cell["rows"].items():
        if label == "authentic errors":
            continue
        assert row["n"] == finished.results["attacks"][label]["n_success"]
        assert row["auc"] >= 0.6, (label, row["auc"])  # measured 0.74-0.87
        assert (
            0.0 <= row["tpr_at_fpr"]["0.01"] <= row["tpr_at_fpr"]["0.05"] <= row["tpr_at_fpr"]["0.1"] <= 1.0
        )
        assert row["roc"]["fpr"][0] == 0.0 and row["roc"]["tpr"][-1] == 1.0


def test_equal_asr_table_uses_the_lowest_asr(finished: run.RunResult) -> None:
    equal = finished.results["equal_asr"]
    assert equal["asr"] == min(cell["asr"] for cell in finished.results["attacks"].values())
    for label, row in equal["rows"].items():
        assert row["L1"] is not None and row["Linf"] <= 0.25 + 1e-6, label


def test_the_same_seed_gives_the_same_results_and_report_rerenders(
    finished: run.RunResult, tmp_path: Path
) -> None:
    again = run_evaluation(load_config(write_config(tmp_path, tmp_path / "again")))
    assert _without_timing(again.results) == _without_timing(finished.results)
    text = again.report.read_text()
    again.report.unlink()
    shutil.rmtree(again.directory / "figures")
    assert render_report(again.directory).read_text() == text
    assert (again.directory / "figures" / "examples.png").stat().st_size > 1000


def test_a_rerun_reuses_finished_cells_and_an_interrupted_run_never_claims_completeness(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path, tmp_path / "out"))
    real = attack_study.run_attack_cell
    calls: list[str] = []

    def interrupted(spec: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(spec.label)
        if spec.label == "PGD (Foolbox)":
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(attack_study, "run_attack_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is False
    assert not (tmp_path / "out" / "report.md").exists()

    calls.clear()
    monkeypatch.setattr(
        attack_study,
        "run_attack_cell",
        lambda spec, *a, **k: (calls.append(spec.label), real(spec, *a, **k))[1],
    )
    result = run_evaluation(config)
    assert calls == ["PGD (Foolbox)"]  # the two finished cells were reused
    assert result.results["complete"] is True

    calls.clear()
    refit = lambda *a, **k: pytest.fail("detector refitted")  # noqa: E731
    monkeypatch.setattr(detector_study, "fit_detector_object", refit)
    again = run_evaluation(config)
    assert calls == []  # attack, detector fit and detector cells reused
    assert again.results["detectors"] == result.results["detectors"]


def test_resume_keys_are_those_existing_run_folders_hold(finished: run.RunResult) -> None:
    """A cell's key: the run's base (data, sample, seed, weights, batch size) and the cell's own parts."""
    config = load_config(write_config(finished.directory.parent, finished.directory))
    digest = finished.results["model"]["sha256"]
    base = key_of("digits", "digits", 40, 0, digest, 64)
    attack_keys = {}
    for spec in config.attacks:
        saved = json.loads((finished.directory / "cells" / f"attack-{slug(spec.label)}.json").read_text())
        attack_keys[spec.label] = key_of(base, dataclasses.asdict(spec))
        assert saved["key"] == attack_keys[spec.label], spec.label
    (detector,) = config.detectors
    saved = json.loads((finished.directory / "cells" / f"detector-{slug('kNN')}.json").read_text())
    assert saved["key"] == key_of(base, dataclasses.asdict(detector), 400, 450 - 40, attack_keys)


def _strict_json(path: Path) -> dict[str, Any]:
    """results.json parsed with NaN and infinities refused (JSON has none; Python's json accepts them)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_a_cell_that_raises_fails_the_run_but_the_others_finish(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, tmp_path / "out")
    real = attack_study.run_attack_cell

    def flaky(spec: Any, *args: Any, **kwargs: Any) -> Any:
        if spec.label == "PGD (Foolbox)":
            raise RuntimeError("the GPU fell over")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(attack_study, "run_attack_cell", flaky)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "xaiadv run: 1 cell failed: attack 'PGD (Foolbox)' (RuntimeError: the GPU fell over)" in err
    assert "rerun the same command to retry them" in err
    results = _strict_json(tmp_path / "out" / "results.json")
    assert results["complete"] is False
    assert results["failed_cells"] == [
        {"kind": "attack", "label": "PGD (Foolbox)", "error": "RuntimeError: the GPU fell over"}
    ]
    assert results["attacks"]["PGD (Foolbox)"]["status"] == "failed"
    assert results["attacks"]["LRP-grad"]["status"] == results["attacks"]["PGD (torchattacks)"]["status"]
    assert results["attacks"]["LRP-grad"]["status"] == "done"
    assert results["detectors"]["kNN"]["status"] == "done"
    assert "PGD (Foolbox)" not in results["detectors"]["kNN"]["rows"]
    assert "- PGD (Foolbox): RuntimeError: the GPU fell over" in (tmp_path / "out" / "report.md").read_text()

    monkeypatch.setattr(attack_study, "run_attack_cell", real)  # fixed: the rerun finishes the run
    assert main(["run", str(path)]) == 0
    results = _strict_json(tmp_path / "out" / "results.json")
    assert results["complete"] is True and results["failed_cells"] == []


def test_a_detector_that_raises_is_a_failed_cell(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no features")

    monkeypatch.setattr(detector_study, "fit_detector_object", broken)
    result = run_evaluation(load_config(write_config(tmp_path, tmp_path / "out")))
    assert result.results["complete"] is False
    assert result.failed_cells == [
        {"kind": "detector_fit", "label": "kNN", "error": "ValueError: no features"},
        {
            "kind": "detector",
            "label": "kNN",
            "error": "RuntimeError: detector_fit 'kNN' failed, so this cell cannot run: "
            "ValueError: no features",
        },
    ]
    assert all(cell["status"] == "done" for cell in result.results["attacks"].values())


def test_ctrl_c_prints_one_line_with_the_resume_hint_and_exits_130(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, tmp_path / "out")
    real = attack_study.run_attack_cell

    def interrupted(spec: Any, *args: Any, **kwargs: Any) -> Any:
        if spec.label == "PGD (Foolbox)":
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(attack_study, "run_attack_cell", interrupted)
    assert main(["run", str(path)]) == 130
    captured = capsys.readouterr()
    assert captured.err.endswith(  # after the progress bars, one line
        f"\nxaiadv run: interrupted; 2 of 5 cells finished and are saved in {tmp_path / 'out'}; "
        "rerun the same command to resume\n"
    )
    assert "Traceback" not in captured.out + captured.err
    assert _strict_json(tmp_path / "out" / "results.json")["complete"] is False


def test_ctrl_c_before_any_cell_says_none_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "load_dataset", interrupted)
    assert main(["run", str(write_config(tmp_path, tmp_path / "out"))]) == 130
    assert capsys.readouterr().err == (
        f"xaiadv run: interrupted; 0 of 5 cells finished and are saved in {tmp_path / 'out'}; "
        "rerun the same command to resume\n"
    )


def test_an_unwritable_output_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(run, "load_dataset", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=r"output: cannot write to .*file/out"):
        run_evaluation(load_config(write_config(tmp_path, blocker / "out")))


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run.torch.cuda, "is_available", lambda: False)
    config = load_config(write_config(tmp_path, tmp_path / "out"), overrides={"device": "cuda"})
    with pytest.raises(ValueError, match=r"device: 'cuda' was asked for but torch sees no CUDA GPU"):
        run_evaluation(config)
    assert not (tmp_path / "out").exists()


def test_cli_run_prints_the_summary_and_the_report_path(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, tmp_path / "cli")
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| attack | ASR | n success | L1 | L2 | Linf |" in out
    assert out.count("\n| ") == 1 + 3  # header + one row per attack (the separator starts with "|-")
    assert f"report: {tmp_path / 'cli' / 'report.md'}" in out
    assert main(["report", str(tmp_path / "cli")]) == 0
    assert f"report: {tmp_path / 'cli' / 'report.md'}" in capsys.readouterr().out


def test_cli_errors_exit_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('output = "x"\n[data]\ndataset = "digits"\nsamples = 5\n[[attacks]]\nname = "art:Nope"\n')
    assert main(["run", str(bad)]) == 2
    assert "bad.toml: attacks[0].name: unknown attack 'art:Nope'; valid names:" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is nowhere a run folder?" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


def test_list_groups_names_by_kind_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line and not line.startswith("  ")]
    assert headings[0] == "attacks from xaiadv (6):"  # the LRP family, IFGSM+noise, DetectorAwarePGD
    assert [h.split(" (")[0] for h in headings] == [
        "attacks from xaiadv",
        "attacks from art",
        "attacks from foolbox",
        "attacks from torchattacks",
        "detectors from xaiadv",
        "detectors from art",
        "studies from xaiadv",
    ]
    assert main(["list", "--flat"]) == 0
    flat = capsys.readouterr().out.split()
    listed = [name for line in out.splitlines() if line.startswith("  ") for name in line.split()]
    assert sorted(listed) == sorted(flat) and len(set(flat)) == len(flat)  # every name once
    counts = [int(h.rsplit("(", 1)[1].rstrip("):")) for h in headings]
    assert sum(counts) == len(flat)
    assert max(len(line) for line in out.splitlines()) <= 100


def test_list_names_attacks_detectors_and_studies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--flat"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert {"xaiadv:LRPGrad", "art:DeepFool", "foolbox:LinfPGD", "torchattacks:PGD"} <= set(names)
    assert {
        "xaiadv:IDefenderDetector",
        "art:BinaryInputDetector",
        "xaiadv:AttackStudy",
        "xaiadv:DetectorStudy",
        "xaiadv:HeatmapStudy",
        "xaiadv:SignatureStudy",
    } <= set(names)
    assert all(name.count(":") == 1 for name in names)
    assert main(["list", "--flat", "--source", "art"]) == 0
    art = capsys.readouterr().out.splitlines()
    assert "art:BinaryActivationDetector" in art and all(name.startswith("art:") for name in art)


def _load(config: Any) -> Any:
    """The model a run of ``config`` attacks, loaded as the run loads it."""
    return load_run_model(
        config.model, dataset="digits", folder=Path(config.folder), device=torch.device("cpu")
    )


def test_a_users_checkpoint_and_factory_are_loaded(cache: Path, tmp_path: Path) -> None:
    """model.checkpoint + model.factory: the user's state dict in the module their factory builds."""
    from xaiadv.evaluation.models import reference_cnn

    torch.manual_seed(1)
    model = reference_cnn((1, 8, 8), 10, width=4)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    body = CONFIG.replace(
        "[model]\nepochs = 4\nmax_train = 800\n",
        f'[model]\ncheckpoint = "{tmp_path / "weights.safetensors"}"\n'
        'factory = "xaiadv.evaluation.models:reference_cnn"\n'
        "factory_kwargs = { input_shape = [1, 8, 8], num_classes = 10, width = 4 }\n",
    )
    config = load_config(write_config(tmp_path, tmp_path / "out", body))
    loaded = _load(config)
    assert loaded.description["kind"] == "checkpoint"
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))
    broken = body.replace("width = 4 }", "width = 8 }")  # weights that do not fit the module
    with pytest.raises(ValueError, match=r"model.checkpoint: cannot load .*weights.safetensors"):
        _load(load_config(write_config(tmp_path, tmp_path / "out", broken)))
    missing = body.replace("models:reference_cnn", "models:no_such_factory")
    with pytest.raises(ValueError, match=r"model.factory: cannot import 'xaiadv.evaluation.models:no_such"):
        _load(load_config(write_config(tmp_path, tmp_path / "out", missing)))


USER_MODULE = """
from torch import nn


def make_model(width=4):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 10)
    )
"""


def _user_model_folder(folder: Path, module: str) -> nn.Module:
    """A factory module and its checkpoint beside where the TOML will be; returns the saved model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(USER_MODULE, encoding="utf-8")
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)
    )
    safetensors.torch.save_file(model.state_dict(), str(folder / "weights.safetensors"))
    return model.eval()


def _user_model_body(module: str, checkpoint: str = "weights.safetensors") -> str:
    """CONFIG with the user's model and a single short attack, no detector."""
    head, _, _ = CONFIG.partition("[model]")
    return (
        head
        + f'[model]\ncheckpoint = "{checkpoint}"\nfactory = "{module}:make_model"\n'
        + "factory_kwargs = { width = 4 }\n\n"
        + '[[attacks]]\nname = "xaiadv:LRPGrad"\nlabel = "LRP-grad"\nparams = { eps = 0.05, max_iter = 3 }\n'
    )


@pytest.fixture
def module_name(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A module name no other test imports; forgotten by sys.modules after the test."""
    name = f"xaiadv_user_models_{request.node.name.split('[')[0][-20:]}"
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_a_factory_module_and_a_relative_checkpoint_beside_the_toml_load_from_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], module_name: str
) -> None:
    project = tmp_path / "project"
    saved = _user_model_folder(project, module_name)
    path = write_config(project, tmp_path / "out", _user_model_body(module_name))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path_before = list(sys.path)
    config = load_config(Path("..") / "project" / "run.toml")
    assert sys.path == path_before  # the config's folder was searched, not added for good
    assert config.model.checkpoint == str(project / "weights.safetensors")
    loaded = _load(config)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), saved(x))
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"]["kind"] == "checkpoint" and results["complete"] is True
    assert results["model"]["checkpoint"] == str(project / "weights.safetensors")
    assert sys.path == path_before


def test_an_absolute_checkpoint_is_taken_as_it_is(tmp_path: Path, module_name: str) -> None:
    project = tmp_path / "project"
    _user_model_folder(project, module_name)
    weights = tmp_path / "weights-elsewhere.safetensors"
    (project / "weights.safetensors").rename(weights)
    config = load_config(write_config(project, tmp_path / "out", _user_model_body(module_name, str(weights))))
    assert config.model.checkpoint == str(weights)


def test_a_missing_factory_module_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], module_name: str
) -> None:
    project = tmp_path / "project"
    _user_model_folder(project, module_name)
    path = write_config(project, tmp_path / "out", _user_model_body("no_such_user_module"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: model.factory: cannot import 'no_such_user_module:make_model'" in err
    assert "No module named 'no_such_user_module'" in err
    assert f"looked in {project} (the config file's folder) and on sys.path (" in err
    assert str(Path(torch.__file__).parents[1]) in err  # site-packages, one of sys.path's entries
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_missing_factory_callable_suggests_a_near_name(tmp_path: Path, module_name: str) -> None:
    project = tmp_path / "project"
    _user_model_folder(project, module_name)
    body = _user_model_body(module_name).replace(":make_model", ":make_modle")
    with pytest.raises(
        ValueError, match=rf"{module_name}.py\) has no attribute 'make_modle'; did you mean 'make_model'\?"
    ):
        load_config(write_config(project, tmp_path / "out", body))


def test_a_factory_whose_own_import_fails_says_which_import(tmp_path: Path, module_name: str) -> None:
    project = tmp_path / "project"
    _user_model_folder(project, module_name)
    (project / f"{module_name}.py").write_text("import no_such_dependency_of_the_user\n")
    with pytest.raises(
        ValueError,
        match=rf"importing {module_name} \(.*{module_name}.py\) failed: "
        r".*No module named 'no_such_dependency_of_the_user'",
    ):
        load_config(write_config(project, tmp_path / "out", _user_model_body(module_name)))


def test_a_missing_checkpoint_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], module_name: str
) -> None:
    project = tmp_path / "project"
    _user_model_folder(project, module_name)
    path = write_config(project, tmp_path / "out", _user_model_body(module_name, "nope/w.safetensors"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{path}: model.checkpoint: no file {project / 'nope' / 'w.safetensors'} (a relative checkpoint is "
        f"taken from the config file's folder, {project})"
    ) in err
    assert not (tmp_path / "out").exists()


def test_report_refuses_another_schema_and_damaged_results(finished: run.RunResult, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished.directory, copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "schema_version": 99}))
    with pytest.raises(ValueError, match=r"has schema version 99; this xaiadv reads 4: run the config again"):
        render_report(copy)
    del results["attacks"]["LRP-grad"]["norms"]
    (copy / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"results.json or its arrays are incomplete or damaged \(KeyError"):
        render_report(copy)
