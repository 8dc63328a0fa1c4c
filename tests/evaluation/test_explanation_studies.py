"""The heatmap study (seed 001 Fig. 3) and the signature study (Figs. 4-6) on digits: end to end in a run,
resumed after an interrupt, their failed cells, the missing extra, and their typed library functions."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.evaluation import attack_study, heatmap_study, signature_study
from xaiadv.evaluation.config import DEMO_CONFIG, ConfigError, load_config
from xaiadv.evaluation.heatmap_study import HeatmapStudy, explain_attack
from xaiadv.evaluation.report import render_report
from xaiadv.evaluation.run import RunResult, run_evaluation
from xaiadv.evaluation.rundir import SCHEMA_VERSION, slug
from xaiadv.evaluation.separability import separability_auc
from xaiadv.evaluation.signature_study import (
    EMBEDDING,
    SignatureStudy,
    select_per_class,
    signature_analysis,
    signature_set,
    umap_embedding,
)
from xaiadv.evaluation.studies import study_registry
from xaiadv.plugins.attacks import lrp_grad

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ATTACKS = """
[[attacks]]
name = "xaiadv:LRPGrad"
label = "LRP-grad"
params = { eps = 0.05, max_iter = 10 }

[[attacks]]
name = "torchattacks:PGD"
label = "PGD (torchattacks)"
params = { eps = 0.25, alpha = 0.05, steps = 5, random_start = false }
"""
NO_SUCCESS = """
[[attacks]]
name = "xaiadv:LRPGrad"
label = "too weak"
params = { eps = 0.0001, max_iter = 1 }
"""


HEATMAPS = '\n[[studies]]\nname = "xaiadv:HeatmapStudy"\nexamples = 2\nk = 8\n'
SIGNATURES = '\n[[studies]]\nname = "xaiadv:SignatureStudy"\nper_class = 3\nclasses = [1, 4]\n'


def config_text(output: Path, *, samples: int = 40, attacks: str = ATTACKS, studies: str = "") -> str:
    return (
        f'output = "{output}"\nseed = 0\nbatch_size = 64\n'
        f'[data]\ndataset = "digits"\nsamples = {samples}\nfit_samples = 400\n'
        "[model]\nepochs = 4\nmax_train = 800\n" + attacks + studies
    )


@pytest.fixture(scope="module")
def finished(cache: Path, tmp_path_factory: pytest.TempPathFactory, write_config) -> RunResult:
    folder = tmp_path_factory.mktemp("run")
    text = config_text(folder / "out", attacks=ATTACKS + NO_SUCCESS, studies=HEATMAPS + SIGNATURES)
    return run_evaluation(load_config(write_config(folder, text)))


def _images(report: str, section: str) -> list[str]:
    """The figures a section of report.md links, in order."""
    body = report.split(section)[1].split("\n## ")[0]
    return [line.split("](")[1].rstrip(")") for line in body.splitlines() if line.startswith("![")]


def _check_pngs(directory: Path, images: list[str]) -> None:
    for image in images:
        data = (directory / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, image


def test_the_heatmap_study_writes_its_numbers_section_and_figures(finished: RunResult, strict_json) -> None:
    results = strict_json(finished.directory / "results.json")
    assert results["schema_version"] == SCHEMA_VERSION == 4 and results["complete"] is True
    assert list(results["heatmaps"]) == ["LRP-grad", "PGD (torchattacks)", "too weak"]
    weak = results["heatmaps"].pop("too weak")  # an attack without success: a done cell of null numbers
    assert weak["status"] == "done" and weak["n"] == results["attacks"]["too weak"]["n_success"] == 0
    assert weak["numbers"]["spearman"] == {"mean": None, "median": None, "n": 0}
    assert weak["undefined"] == dict.fromkeys(heatmap_study.NUMBERS, "no successful sample")
    for label, cell in results["heatmaps"].items():
        attack = results["attacks"][label]
        assert cell["status"] == "done" and cell["undefined"] == {}
        assert cell["n"] == attack["n_success"] > 20, label
        assert cell["composite"] == "epsilon_plus_flat" and cell["k"] == 8
        numbers = cell["numbers"]
        assert all(numbers[name]["n"] == cell["n"] for name in heatmap_study.NUMBERS)
        # the attacks change the explanation (Spearman < 1), and relevance gathers on what they changed
        # (measured: LRP-grad 0.92 / 0.48 vs 0.35; PGD 0.47 / 0.86 vs 0.81)
        assert -1.0 <= numbers["spearman"]["mean"] < 0.99, label
        assert 0.0 <= numbers["top_k_overlap"]["mean"] < 1.0, label
        assert numbers["perturbed_share"]["mean"] > numbers["changed_share"]["mean"], label
        arrays = np.load(finished.directory / "arrays" / f"heatmap-{slug(label)}.npz")
        assert len(arrays["index"]) == cell["n"]
        assert np.mean(arrays["spearman"]) == pytest.approx(numbers["spearman"]["mean"])
        assert np.median(arrays["top_k_overlap"]) == pytest.approx(numbers["top_k_overlap"]["median"])
        assert arrays["example_clean_original"].shape == (2, 1, 8, 8)
    # the cheaper perturbation (LRP-grad's early stop) leaves the explanation closer to the clean one
    spearman = {label: cell["numbers"]["spearman"]["mean"] for label, cell in results["heatmaps"].items()}
    assert spearman["LRP-grad"] > spearman["PGD (torchattacks)"]
    report = finished.report.read_text()
    section = "## Explanation heatmaps, clean vs adversarial (seed 001 Fig. 3; thesis A.1)"
    assert section in report and "| attack | n | Spearman | top-k overlap |" in report
    images = _images(report, section)
    assert len(images) == 2  # none for the attack without success, whose row says n/a
    assert "| too weak | 0 | n/a | n/a | n/a | n/a |" in report
    _check_pngs(finished.directory, images)


def test_the_signature_study_writes_aucs_embedding_section_and_figures(
    finished: RunResult, strict_json
) -> None:
    results = strict_json(finished.directory / "results.json")
    sample = np.load(finished.directory / "arrays" / f"sample-{slug('sample')}.npz")
    correct = sample["y"][sample["prediction"] == sample["y"]]
    n_clean = sum(min(3, int((correct == c).sum())) for c in range(10))  # per_class = 3
    assert list(results["signatures"]) == ["LRP-grad", "PGD (torchattacks)", "too weak"]
    weak = results["signatures"].pop("too weak")
    assert weak["n_adversarial"] == 0 and weak["auc"] == {"signature": None, "hidden": None}
    assert weak["undefined"]["hidden"] == (
        f"5-fold cross-validation needs 5 samples on each side; got {n_clean} clean and 0 adversarial"
    )
    for label, cell in results["signatures"].items():
        assert cell["status"] == "done" and cell["undefined"] == {}, label
        assert cell["layer"] == "8" and cell["width"] == 128  # the reference CNN's last Linear and its input
        assert cell["n_clean"] == n_clean and 5 <= cell["n_adversarial"] <= cell["n_clean"], label
        assert set(cell["auc"]) == {"signature", "hidden"}
        assert all(0.0 <= auc <= 1.0 for auc in cell["auc"].values()), label
    # measured 0.86 / 0.71 on the signatures: relevance tells these adversarial examples from clean ones
    assert results["signatures"]["LRP-grad"]["auc"]["signature"] >= 0.7
    (embedding,) = results["embeddings"].values()
    assert embedding["status"] == "done" and embedding["label"] == EMBEDDING
    assert embedding["attacks"] == ["LRP-grad", "PGD (torchattacks)", "too weak"]
    assert embedding["shown_classes"] == [1, 4]
    assert embedding["n_points"] == embedding["n_clean"] + sum(
        cell["n_adversarial"] for cell in results["signatures"].values()
    )
    arrays = np.load(finished.directory / "arrays" / f"embedding-{slug(EMBEDDING)}.npz")
    assert arrays["embedding"].shape == (embedding["n_points"], 2) and np.isfinite(arrays["embedding"]).all()
    assert (arrays["group"] == -1).sum() == embedding["n_clean"] == n_clean
    report = finished.report.read_text()
    section = "## LRP signatures and UMAP (seed 001 Figs. 4-6)"
    assert "| attack | n clean | n adversarial | AUC signatures | AUC hidden state |" in report
    assert f"| too weak | {n_clean} | 0 | n/a | n/a |" in report
    assert f"- too weak: 5-fold cross-validation needs 5 samples on each side; got {n_clean} clean" in report
    images = _images(report, section)
    assert [Path(image).name for image in images] == [
        "signatures-by-class.png",
        "signatures-class-1.png",
        "signatures-class-4.png",
    ]
    _check_pngs(finished.directory, images)


def test_a_rerun_after_an_interrupt_recomputes_only_the_unfinished_study_cells(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strict_json, write_config
) -> None:
    path = write_config(tmp_path, config_text(tmp_path / "out", studies=HEATMAPS + SIGNATURES))
    calls: list[str] = []
    interrupt = {"at": "PGD (torchattacks)"}  # the signature cell of this attack is interrupted, once

    def counted(module: Any, name: str) -> None:
        real = getattr(module, name)

        def wrapper(study: Any, run: Any, *args: Any) -> Any:
            label = args[0] if isinstance(args[0], str) else "embedding"
            calls.append(f"{name}:{label}")
            if name == "run_signature_cell" and label == interrupt["at"]:
                raise KeyboardInterrupt
            return real(study, run, *args)

        monkeypatch.setattr(module, name, wrapper)

    attack_calls: list[str] = []
    real_attack = attack_study.run_attack_cell
    monkeypatch.setattr(
        attack_study,
        "run_attack_cell",
        lambda spec, *a, **k: (attack_calls.append(spec.label), real_attack(spec, *a, **k))[1],
    )
    counted(heatmap_study, "run_heatmap_cell")
    counted(signature_study, "run_signature_cell")
    counted(signature_study, "run_embedding_cell")
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(load_config(path))
    assert not (tmp_path / "out" / "report.md").exists()
    assert strict_json(tmp_path / "out" / "results.json")["complete"] is False
    assert calls == [
        "run_heatmap_cell:LRP-grad",
        "run_heatmap_cell:PGD (torchattacks)",
        "run_signature_cell:LRP-grad",
        "run_signature_cell:PGD (torchattacks)",
    ]

    calls.clear()
    attack_calls.clear()
    interrupt["at"] = None
    result = run_evaluation(load_config(path))
    assert attack_calls == []  # attack cells reused
    assert calls == ["run_signature_cell:PGD (torchattacks)", "run_embedding_cell:embedding"]
    assert result.results["complete"] is True

    calls.clear()
    again = run_evaluation(load_config(path))
    assert calls == [] and attack_calls == []
    for kind in ("heatmaps", "signatures", "embeddings"):
        assert again.results[kind] == result.results[kind]


def test_no_successful_attack_is_a_failed_heatmap_cell_and_the_run_goes_on(
    cache: Path, tmp_path: Path, strict_json, write_config
) -> None:
    text = config_text(tmp_path / "out", attacks=NO_SUCCESS, studies=HEATMAPS + SIGNATURES)
    result = run_evaluation(load_config(write_config(tmp_path, text)))
    attack = result.results["attacks"]["too weak"]
    assert attack["n_success"] == 0
    assert result.results["complete"] is False
    assert result.failed_cells == [
        {
            "kind": "heatmap",
            "label": "xaiadv:HeatmapStudy",
            "error": "ValueError: no attack of this run has a successful adversarial example to explain "
            f"(too weak: 0 of {attack['n_correct']}); the heatmap study compares clean and adversarial "
            "heatmaps of successful samples only",
        }
    ]
    signature = result.results["signatures"]["too weak"]
    assert signature["status"] == "done" and signature["n_adversarial"] == 0
    assert signature["auc"] == {"signature": None, "hidden": None}
    assert signature["undefined"]["signature"].startswith("5-fold cross-validation needs 5 samples on each")
    assert result.results["embeddings"][EMBEDDING]["status"] == "done"  # the clean samples by class
    report = result.report.read_text()
    assert "- xaiadv:HeatmapStudy: ValueError: no attack of this run has a successful" in report
    strict_json(result.directory / "results.json")


def test_one_class_only_is_a_failed_embedding_cell_and_the_run_goes_on(
    cache: Path, tmp_path: Path, write_config
) -> None:
    studies = '\n[[studies]]\nname = "xaiadv:SignatureStudy"\n'  # the first 2: a 2 taken for a 3, a 0
    result = run_evaluation(
        load_config(write_config(tmp_path, config_text(tmp_path / "out", samples=2, studies=studies)))
    )
    assert [cell["kind"] for cell in result.failed_cells] == ["embedding"]
    (failed,) = result.failed_cells
    assert failed["label"] == EMBEDDING
    assert failed["error"] == (
        "ValueError: the clean signatures hold class 0 only (1 sample); a UMAP by class (seed 001 Fig. 4) "
        "needs at least two classes: raise the study's per_class or the run's data.samples"
    )
    assert all(cell["status"] == "done" for cell in result.results["signatures"].values())
    assert "Failed:" in result.report.read_text()


def test_umap_embedding_runs_on_the_exact_neighbour_graph() -> None:
    """Oracle: UMAP given the brute-force 5-neighbour graph by hand (float64 pairwise distances) draws the
    same embedding, and two far-apart clusters stay apart in it."""
    from umap import UMAP

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0.0, 1.0, (30, 6)), rng.normal(25.0, 1.0, (30, 6))])
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    indices = np.argsort(distances, axis=1, kind="stable")[:, :5]
    expected = UMAP(
        n_components=2,
        n_neighbors=5,
        random_state=7,
        n_jobs=1,
        precomputed_knn=(indices, np.take_along_axis(distances, indices, 1), None),
    ).fit_transform(points)
    embedding = umap_embedding(points, seed=7, n_neighbors=5)
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-5)
    first, second = embedding[:30], embedding[30:]
    gap = np.linalg.norm(first.mean(0) - second.mean(0))
    assert gap > 3 * max(first.std(0).max(), second.std(0).max())


def test_without_umap_learn_the_error_names_the_extra(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError
    with pytest.raises(ImportError, match=r"needs umap-learn: pip install 'xaiadv\[explain\]'"):
        umap_embedding(np.zeros((5, 3)), seed=0)
    result = run_evaluation(
        load_config(write_config(tmp_path, config_text(tmp_path / "out", studies=SIGNATURES)))
    )
    assert result.failed_cells == [
        {
            "kind": "embedding",
            "label": EMBEDDING,
            "error": "ImportError: the signature study's UMAP (seed 001 Figs. 4-6) needs umap-learn: "
            "pip install 'xaiadv[explain]'",
        }
    ]
    assert all(cell["status"] == "done" for cell in result.results["signatures"].values())


@pytest.mark.parametrize(
    ("study", "message"),
    [
        (
            'name = "xaiadv:HeatmapStudy"\nk = 65',
            r"studies\[0\]\.k: 65 is more than the 64 values of a digits",
        ),
        ('name = "xaiadv:HeatmapStudy"\nk = 0', r"studies\[0\]\.k must be"),
        ('name = "xaiadv:HeatmapStudy"\nexamples = 0', r"studies\[0\]\.examples must be"),
        (
            'name = "xaiadv:HeatmapStudy"\ncomposite = "nope"',
            r"studies\[0\]\.composite must be .* got 'nope'",
        ),
        (
            'name = "xaiadv:HeatmapStudy"\nattacks = ["PGD"]',
            r"studies\[0\]\.attacks: \['PGD'\] are not attack labels of this run; valid: LRP-grad, PGD \(t",
        ),
        ('name = "xaiadv:SignatureStudy"\nper_class = 0', r"studies\[0\]\.per_class must be"),
        ('name = "xaiadv:SignatureStudy"\nseed = -1', r"studies\[0\]\.seed must be"),
        (
            'name = "xaiadv:SignatureStudy"\nclasses = [-1]',
            r"studies\[0\]\.classes: expected a list of class",
        ),
        (
            'name = "xaiadv:SignatureStudy"\nlayer = ""',
            r"studies\[0\]\.layer: expected the name of the model",
        ),
        ('name = "xaiadv:SignatureStudy"\nattacks = "LRP-grad"', r"studies\[0\]\.attacks: expected a list"),
        ('name = "xaiadv:SignatureStudy"\nper_klass = 3', r"unknown key\(s\) studies\[0\]\.per_klass"),
    ],
)
def test_bad_study_parameters_are_refused_when_the_config_loads(
    tmp_path: Path, study: str, message: str, write_config
) -> None:
    path = write_config(tmp_path, config_text(tmp_path / "out", studies=f"\n[[studies]]\n{study}\n"))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_studies_parameters_and_their_defaults() -> None:
    assert HeatmapStudy() == HeatmapStudy(composite="epsilon_plus_flat", examples=4, k=16, attacks=())
    assert HeatmapStudy(attacks=["a"]).to_dict() == {
        "name": "xaiadv:HeatmapStudy",
        "composite": "epsilon_plus_flat",
        "examples": 4,
        "k": 16,
        "attacks": ("a",),
    }
    assert SignatureStudy(classes=[3]).to_dict() == {
        "name": "xaiadv:SignatureStudy",
        "layer": None,
        "per_class": 50,
        "seed": None,
        "classes": (3,),
        "attacks": (),
    }


# -------------------------------------------------------------------------------------------------
# the typed library functions


def test_explain_attack_summarizes_the_numbers_of_successful_pairs(
    digits_cnn: nn.Module, digits_correct: Any
) -> None:
    x, y = digits_correct[0][:16], digits_correct[1][:16]
    x_adv = lrp_grad(digits_cnn, x, y, eps=0.05, max_iter=20).x_adv
    with torch.no_grad():
        adversarial = digits_cnn(x_adv).argmax(1)
    explanation = explain_attack(digits_cnn, x, x_adv, y, adversarial, k=6, batch_size=5)
    summary, undefined = explanation.summary()
    assert undefined == {} and set(summary) == set(heatmap_study.NUMBERS)
    for name, values in explanation.numbers.items():
        assert values.shape == (16,)
        assert summary[name] == {
            "mean": pytest.approx(values.mean()),
            "median": pytest.approx(np.median(values)),
            "n": 16,
        }
    same = explain_attack(digits_cnn, x, x.clone(), y, y, k=6)
    same_summary, _ = same.summary()
    assert same_summary["spearman"]["mean"] == pytest.approx(1.0)
    assert same_summary["top_k_overlap"]["mean"] == 1.0 and same_summary["changed_share"]["mean"] == 0.0
    nothing = heatmap_study.AttackExplanation(same.heatmaps, {name: np.zeros(0) for name in same.numbers})
    empty, reasons = nothing.summary()
    assert empty["spearman"] == {"mean": None, "median": None, "n": 0}
    assert reasons["spearman"] == "no successful sample"


def test_select_per_class_takes_the_first_eligible_of_each_class() -> None:
    y = np.array([0, 1, 0, 0, 1, 2, 0, 1])
    eligible = np.array([True, True, False, True, True, True, True, True])
    assert select_per_class(y, eligible, 2).tolist() == [0, 1, 3, 4, 5]
    assert select_per_class(y, eligible, 9).tolist() == [0, 1, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="per_class must be"):
        select_per_class(y, eligible, 0)


def test_signature_analysis_is_seeded_and_its_auc_is_separability_auc(
    digits_cnn: nn.Module, digits_correct: Any
) -> None:
    x, y = digits_correct[0][:60], digits_correct[1][:60]
    x_adv = lrp_grad(digits_cnn, x, y, eps=0.05, max_iter=20).x_adv
    analysis = signature_analysis(digits_cnn, x, {"LRP-grad": x_adv}, seed=3)
    clean = signature_set(digits_cnn, x)
    np.testing.assert_array_equal(analysis.clean.signatures, clean.signatures)
    assert clean.target.tolist() == y.tolist()  # the predicted class, here the true one
    last = [m for m in digits_cnn.modules() if isinstance(m, nn.Linear)][-1]
    weights = last.weight.detach().double().numpy()[clean.target]
    np.testing.assert_allclose(clean.signatures, clean.hidden * weights, rtol=1e-4, atol=1e-9)  # R = a W_c
    adversarial = analysis.adversarial["LRP-grad"]
    assert analysis.auc["LRP-grad"]["signature"] == separability_auc(
        clean.signatures, adversarial.signatures, seed=3
    )
    assert analysis.auc["LRP-grad"]["hidden"] == separability_auc(clean.hidden, adversarial.hidden, seed=3)
    assert analysis.embedding.shape == (120, 2)
    again = umap_embedding(np.concatenate([clean.signatures, adversarial.signatures]), seed=3)
    np.testing.assert_array_equal(again, analysis.embedding)  # deterministic on CPU for a seed
    other = umap_embedding(np.concatenate([clean.signatures, adversarial.signatures]), seed=4)
    assert not np.array_equal(other, analysis.embedding)
    zeros = x[y == 0]
    with pytest.raises(ValueError, match=rf"class 0 only \({len(zeros)} samples\); a UMAP by class"):
        signature_analysis(digits_cnn, zeros, {})


def test_the_report_rerenders_both_sections_from_the_saved_cells(finished: RunResult, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished.directory, copy)
    text = (copy / "report.md").read_text()
    (copy / "report.md").unlink()
    shutil.rmtree(copy / "figures")
    assert render_report(copy).read_text() == text
    _check_pngs(copy, _images(text, "## Explanation heatmaps") + _images(text, "## LRP signatures"))


def test_demo_toml_documents_every_parameter_of_every_study() -> None:
    """The header of evaluation/demo.toml names each registered study and, in its paragraph, each field."""
    header = "\n".join(line for line in DEMO_CONFIG.read_text().splitlines() if line.startswith("#"))
    registry = study_registry()
    assert {"xaiadv:HeatmapStudy", "xaiadv:SignatureStudy"} <= set(registry)
    for name, cls in registry.items():
        assert f'name = "{name}"' in header, name
        paragraph = header.split(f'name = "{name}"')[1].split('name = "xaiadv:')[0]
        for field in dataclasses.fields(cls):
            assert re.search(rf"\b{field.name}\b", paragraph), (name, field.name)
