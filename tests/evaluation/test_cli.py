"""Tests of the ``xaiadv`` command line: list, train, demo, bench, errors, tables, the console script."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xaiadv.bridge.registry import available_attacks
from xaiadv.evaluation import bench, demo, run
from xaiadv.evaluation.bench import BenchRow
from xaiadv.evaluation.cli import format_table, main
from xaiadv.evaluation.config import AttackSpec, ModelSpec, RunConfig
from xaiadv.evaluation.detector_study import detector_registry
from xaiadv.evaluation.models import TrainConfig, load_model
from xaiadv.evaluation.studies import default_studies, study_registry

NAME_LINE = re.compile(r"^(xaiadv|art|foolbox|torchattacks):[A-Za-z0-9_]+$")
#: The demo config cut to two short attacks, no detector and a tiny model, so `xaiadv demo` runs in seconds.
FAST_ATTACKS = (
    AttackSpec("xaiadv:LRPGrad", "LRP-grad", {"eps": 0.05, "max_iter": 5}),
    AttackSpec(
        "art:BasicIterativeMethod",
        "IFGSM (ART BIM)",
        {"eps": 1.0, "eps_step": 1 / 256, "max_iter": 5, "batch_size": 128, "verbose": False},
    ),
)
TINY = ModelSpec(epochs=3, width=8, max_train=600)


pytestmark = pytest.mark.usefixtures("isolated")  # tests/evaluation/conftest.py


@pytest.fixture
def fast_demo(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """The demo as the CLI runs it, with FAST_ATTACKS and the TINY model; records the configs it got."""
    configs: list[RunConfig] = []

    def fast(config: RunConfig, **kwargs: object) -> run.RunResult:
        configs.append(config)
        cut = dataclasses.replace(
            config, attacks=FAST_ATTACKS, detectors=(), model=TINY, studies=default_studies()
        )
        return run.run_evaluation(cut, **kwargs)

    monkeypatch.setattr(demo, "run_evaluation", fast)
    return configs


def _table_rows(text: str) -> list[list[str]]:
    """Cells of every Markdown table line in ``text`` (header and separator included)."""
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


# --------------------------------------------------------------------------------------------------
# list


def test_list_flat_prints_every_attack_detector_and_study_one_per_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list", "--flat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == available_attacks() + sorted(detector_registry()) + sorted(study_registry())
    assert {"xaiadv:IDefenderDetector", "art:BinaryActivationDetector", "xaiadv:DetectorStudy"} <= set(lines)
    assert {"xaiadv:LRPGrad", "art:BasicIterativeMethod", "xaiadv:LRPFlip"} <= set(lines)
    assert {line.partition(":")[0] for line in lines} == {"xaiadv", "art", "foolbox", "torchattacks"}
    assert all(NAME_LINE.match(line) for line in lines), [line for line in lines if not NAME_LINE.match(line)]


def test_list_source_filters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--flat", "--source", "xaiadv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "xaiadv:LRPGrad" in lines
    assert lines and all(line.startswith("xaiadv:") for line in lines)
    assert lines == available_attacks("xaiadv") + [
        n for n in (*sorted(detector_registry()), *sorted(study_registry())) if n.startswith("xaiadv:")
    ]


def test_list_unknown_source_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--source", "cleverhans"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cleverhans'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# train


def test_train_prints_accuracy_and_an_existing_model_path(
    capsys: pytest.CaptureFixture[str], isolated: Path
) -> None:
    assert main(["train", "--dataset", "digits", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    match = re.fullmatch(r"digits: test accuracy (\d\.\d{4})\nmodel: (.+\.safetensors)\n", out)
    assert match, out
    accuracy, path = float(match.group(1)), Path(match.group(2))
    assert path.is_file()
    assert path.parent == isolated / "models"
    saved = load_model(path.with_suffix(""))
    assert saved.config == TrainConfig(dataset="digits", epochs=2)
    assert accuracy == pytest.approx(saved.test_accuracy, abs=5e-5)
    assert accuracy > 0.5
    # a second run loads the cached model and says the same
    assert main(["train", "--dataset", "digits", "--epochs", "2"]) == 0
    assert capsys.readouterr().out == out


# --------------------------------------------------------------------------------------------------
# demo


def test_demo_runs_the_builtin_config_and_prints_the_summary(
    capsys: pytest.CaptureFixture[str], fast_demo: list[RunConfig], tmp_path: Path
) -> None:
    output = tmp_path / "demo"
    assert main(["demo", "--dataset", "digits", "--samples", "20", "--output", str(output)]) == 0
    (config,) = fast_demo
    assert (config.dataset, config.samples, config.output) == ("digits", 20, str(output))
    assert (
        len(config.attacks) >= 12 and len(config.detectors) == len(detector_registry()) + 1
    )  # I-defender twice
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err
    assert re.search(r"^digits: 20 test images, \d+ initially correct$", captured.out, re.MULTILINE)
    rows = _table_rows(captured.out)
    assert rows[0] == ["attack", "ASR", "n success", "L1", "L2", "Linf"]
    assert [row[0] for row in rows[2:]] == [spec.label for spec in FAST_ATTACKS]
    for row in rows[2:]:
        assert 0.0 <= float(row[1]) <= 1.0 and int(row[2]) >= 0
        for cell in row[3:]:  # medians: a number when something succeeded, else n/a
            assert (cell == "n/a") == (int(row[2]) == 0), row
    assert f"report: {output / 'report.md'}" in captured.out
    assert (output / "report.md").read_text().startswith("# xaiadv evaluation report")


def test_demo_says_when_it_fell_back_to_digits(
    capsys: pytest.CaptureFixture[str], fast_demo: list[RunConfig], tmp_path: Path
) -> None:
    assert main(["demo", "--samples", "5", "--output", str(tmp_path / "demo")]) == 0
    assert fast_demo[0].dataset == "fashion_mnist"
    captured = capsys.readouterr()
    assert re.search(r"WARNING: fashion_mnist was not found .*this run used digits instead", captured.err)
    assert re.search(r"^digits: 5 test images", captured.out, re.MULTILINE)
    assert len(_table_rows(captured.out)) == 2 + len(FAST_ATTACKS)
    assert (
        "(fallback: the configured data set was not found)" in (tmp_path / "demo" / "report.md").read_text()
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["demo", "--samples", "0"],
            "evaluation/demo.toml: data.samples must be an int > 0; got 0",
        ),
        (
            ["train", "--dataset", "digits", "--epochs", "0"],
            "xaiadv train: error: epochs: expected an integer >= 1",
        ),
        (["bench", "--iterations", "0"], "xaiadv bench: error: iterations must be an int > 0; got 0"),
        (["train", "--dataset", "mnist"], "xaiadv train: error: dataset 'mnist' not found"),
    ],
    ids=["demo-samples", "train-epochs", "bench-iterations", "train-missing-data"],
)
def test_errors_become_exit_code_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str, isolated: Path
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""
    assert not (isolated / "models").exists()  # nothing was trained or written


# --------------------------------------------------------------------------------------------------
# bench (run_bench itself is tested in test_bench.py)


def test_bench_prints_the_rows_of_run_bench(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[int, int, int, int, int]] = []

    def fake_run_bench(
        batch_size: int, iterations: int, repeats: int, references: int, processes: int
    ) -> list[BenchRow]:
        calls.append((batch_size, iterations, repeats, references, processes))
        return [
            BenchRow("art", "IFGSM", 0.0123456, "IFGSM", 1.0, "s/iteration", (1.0, 1.0)),
            BenchRow("art", "LRPGrad", 0.5, "IFGSM", 40.5, "s/iteration", (38.25, 41.0)),
            BenchRow("zennit", "gradient step", 0.25, "gradient step", 1.0, "s/batch"),
        ]

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    argv = ["bench", "--batch-size", "4", "--iterations", "2", "--repeats", "1", "--references", "500"]
    assert main([*argv, "--processes", "2"]) == 0
    assert calls == [(4, 2, 1, 500, 2)]
    out = capsys.readouterr().out
    assert out.startswith(
        "batch 4, 2 iterations, early stop off, median of 1 interleaved runs; "
        "attacks: median over 2 fresh processes (range: lowest-highest)\n"
    )
    assert _table_rows(out)[2:] == [
        ["art", "IFGSM", "0.01235", "s/iteration", "1", "1-1", "IFGSM"],
        ["art", "LRPGrad", "0.5", "s/iteration", "40.5", "38.2-41", "IFGSM"],
        ["zennit", "gradient step", "0.25", "s/batch", "1", "", "gradient step"],
    ]


def test_bench_knn_scale_parses_its_flags_and_prints_the_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, object]] = []

    def fake_rows(**kwargs: object) -> list[bench.KNNScaleRow]:
        calls.append(kwargs)
        return [
            bench.KNNScaleRow(2_000, "torch", 1234.25, 700.0, 1.5, 1.0, 900.0, 800.0, 0.5, 50),
            bench.KNNScaleRow(
                2_000, "faiss IVF16,Flat, nprobe 2", 5000.0, 3000.0, 2.25, 0.961, 950.0, 800.0, 1.25, 50
            ),
        ]

    def no_run_bench(**kwargs: object) -> None:
        raise AssertionError("--knn-scale ran the attack bench")

    monkeypatch.setattr(bench, "knn_scale_rows", fake_rows)
    monkeypatch.setattr(bench, "run_bench", no_run_bench)
    argv = ["bench", "--knn-scale", "--knn-sizes", "2000", "5000", "--knn-index", "IVF16,Flat"]
    assert main([*argv, "--nprobe", "2", "--queries", "50", "--repeats", "2"]) == 0
    assert calls == [{"sizes": (2_000, 5_000), "ivf": "IVF16,Flat", "nprobe": 2, "queries": 50, "repeats": 2}]
    out = capsys.readouterr().out
    assert out.startswith("KNNScore.score (k=10, l2) of 50 queries among synthetic 256-d clustered features")
    assert _table_rows(out) == [
        [
            "references",
            "search",
            "images/s",
            "images/CPU-s",
            "load",
            "recall@10",
            "peak MiB",
            "base MiB",
            "fit s",
        ],
        ["---"] * 9,
        ["2000", "torch", "1234", "700", "1.5", "1", "900", "800", "0.5"],
        ["2000", "faiss IVF16,Flat, nprobe 2", "5000", "3000", "2.25", "0.961", "950", "800", "1.25"],
    ]
    assert main(["bench", "--knn-scale"]) == 0  # knn_scale_rows' own defaults: nothing but the counts
    assert calls[1] == {"queries": 1000, "repeats": 5}


@pytest.mark.parametrize("flag", ["--knn-sizes", "--nprobe", "--queries"])
def test_bench_knn_scale_counts_must_be_positive(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--knn-scale", flag, "0"])
    assert exit_info.value.code == 2
    assert "expected an integer > 0, got '0'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# format_table


def test_format_table_exact_markdown() -> None:
    table = format_table(
        ("name", "value", "count"), [("a", 0.123456, 3), ("b", float("nan"), 10), ("c", 123456.0, -1)]
    )
    assert table == (
        "| name | value | count |\n"
        "|---|---|---|\n"
        "| a | 0.1235 | 3 |\n"
        "| b | n/a | 10 |\n"
        "| c | 1.235e+05 | -1 |"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3.14159265, "3.142"),
        (2.0, "2"),
        (1 / 3, "0.3333"),
        (0.000123456, "0.0001235"),
        (1234.5678, "1235"),
        (float("nan"), "n/a"),
        (-math.nan, "n/a"),
        (math.inf, "inf"),
        (7, "7"),
        ("x", "x"),
        (None, "None"),
    ],
)
def test_format_table_cells(value: object, text: str) -> None:
    assert format_table(("h",), [(value,)]).splitlines()[2] == f"| {text} |"


def test_format_table_numpy_float64_nan_is_na() -> None:
    import numpy as np

    assert format_table(("h",), [(np.float64("nan"),), (np.float64(0.987654),)]).splitlines()[2:] == [
        "| n/a |",
        "| 0.9877 |",
    ]


def test_format_table_without_rows_is_header_only() -> None:
    assert format_table(("a", "b"), []) == "| a | b |\n|---|---|"


# --------------------------------------------------------------------------------------------------
# the installed console script


def test_console_script_list_runs(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("xaiadv")
    assert script.is_file(), f"console script missing next to {sys.executable}"
    env = {**os.environ, "XAIADV_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [str(script), "list", "--flat", "--source", "xaiadv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "xaiadv:LRPGrad" in lines
    assert lines == available_attacks("xaiadv") + [
        n for n in (*sorted(detector_registry()), *sorted(study_registry())) if n.startswith("xaiadv:")
    ]
