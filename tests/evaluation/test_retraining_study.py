"""The retraining study (seed 001 Table 1; thesis 4.3) on digits: end to end through ART's own trainer,
resumed after an interrupt, its cache of immune models beside (never over) the clear model, and its typed
library functions."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from art.defences.trainer import AdversarialTrainer
from torch import nn

from xaiadv.evaluation import retraining_study
from xaiadv.evaluation.config import ConfigError, ModelSpec, load_config
from xaiadv.evaluation.figures import plot_value_grids
from xaiadv.evaluation.heatmaps import explanation_heatmaps, spearman
from xaiadv.evaluation.models import load_or_retrain, load_run_model, retrained_key
from xaiadv.evaluation.retraining_study import (
    CLEAR,
    RetrainingStudy,
    adversarial_retrain,
    precomputed_attack,
    reattack_label,
    retraining_set,
    training_rows,
)
from xaiadv.evaluation.run import RunResult, run_evaluation
from xaiadv.evaluation.rundir import slug

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHIPPED = Path(__file__).resolve().parents[2] / "evaluation" / "retraining.toml"
CPU = torch.device("cpu")
LABELS = ["FGSM", "LRP-grad"]
ATTACKS = """
[[attacks]]
name = "art:FastGradientMethod"
label = "FGSM"
params = { eps = 0.2 }

[[attacks]]
name = "xaiadv:LRPGrad"
label = "LRP-grad"
params = { eps = 0.05, max_iter = 10 }
"""
STUDY = (
    '\n[[studies]]\nname = "xaiadv:RetrainingStudy"\ntrain_samples = 150\nclean_samples = 600\nepochs = 3\n'
)


def config_text(output: Path, study: str = STUDY) -> str:
    return (
        f'output = "{output}"\nseed = 0\nbatch_size = 64\n'
        '[data]\ndataset = "digits"\nsamples = 40\nfit_samples = 400\n'
        "[model]\nepochs = 4\nmax_train = 800\n" + ATTACKS + study
    )


def untimed(cells: dict[str, Any]) -> dict[str, Any]:
    """Cells without their seconds per image (what legitimately differs between two runs)."""
    return {
        label: {k: v for k, v in cell.items() if k != "seconds_per_image"} for label, cell in cells.items()
    }


def file_digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def trainer_calls() -> Iterator[list[AdversarialTrainer]]:
    """Every AdversarialTrainer.fit of the module's runs, recorded (and then run for real)."""
    calls: list[AdversarialTrainer] = []
    real = AdversarialTrainer.fit

    def recorded(self: AdversarialTrainer, *args: Any, **kwargs: Any) -> None:
        calls.append(self)
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdversarialTrainer, "fit", recorded)
        yield calls


@pytest.fixture(scope="module")
def finished(
    cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
    trainer_calls: list[AdversarialTrainer],
    write_config,
) -> tuple[RunResult, dict[str, str]]:
    """The study's run, and the clear model's cache files as they were before the study retrained."""
    folder = tmp_path_factory.mktemp("run")
    load_run_model(ModelSpec(epochs=4, max_train=800), dataset="digits", folder=folder, device=CPU)
    clear_files = file_digests(cache / "models")
    trainer_calls.clear()
    return run_evaluation(load_config(write_config(folder, config_text(folder / "out")))), clear_files


def test_the_study_writes_table_1_the_cross_tables_and_the_figure(
    finished: tuple[RunResult, Any], strict_json
) -> None:
    result, _ = finished
    results = strict_json(result.directory / "results.json")
    assert results["complete"] is True
    sample = np.load(result.directory / "arrays" / f"sample-{slug('sample')}.npz")
    y = sample["y"]
    assert list(results["retraining_sets"]) == LABELS
    for label, cell in results["retraining_sets"].items():
        assert cell["status"] == "done" and cell["n"] == 150
        assert 0 < cell["n_fooled"] <= cell["n_correct"] <= 150
        assert cell["asr"] == pytest.approx(cell["n_fooled"] / cell["n_correct"])
        arrays = np.load(result.directory / "arrays" / f"retraining_set-{slug(label)}.npz")
        assert arrays["x_adv"].shape == (150, 1, 8, 8) and arrays["fooled"].sum() == cell["n_fooled"]
    models = results["immune_models"]
    assert list(models) == [CLEAR, *LABELS]
    clear = models[CLEAR]
    assert clear["clean_accuracy"] == pytest.approx(np.mean(sample["prediction"] == y))
    assert clear["test_accuracy"] == pytest.approx(results["model"]["test_accuracy"])
    for label in LABELS:
        attack = np.load(result.directory / "arrays" / f"attack-{slug(label)}.npz")  # the oracle
        found = clear["transferred"][label]
        assert found["accuracy"] == pytest.approx(np.mean(attack["adversarial_prediction"] == y))
        assert found["recovered"] == 0.0 and found["n_fooled"] == results["attacks"][label]["n_success"]
    for label in LABELS:
        cell = models[label]
        training = cell["training"]
        n_fooled = results["retraining_sets"][label]["n_fooled"]
        assert training["protocol"] == "supplement" and training["lr"] == 1e-3 and training["epochs"] == 3
        assert training["n_train"] == 600 + n_fooled and training["n_adversarial"] == n_fooled
        # seed 001's finding: the immune model classifies more of its attack's transferred examples
        # (measured: FGSM 0.30 vs 0.175, LRP-grad 0.70 vs 0.075) and keeps its clean accuracy (>= 0.875)
        own = cell["transferred"][label]
        assert own["accuracy"] > clear["transferred"][label]["accuracy"] + 0.1, label
        assert own["recovered"] > 0.2 and cell["test_accuracy"] > 0.85, label
    reattacks = results["reattacks"]
    assert list(reattacks) == [reattack_label(a, b) for a in LABELS for b in LABELS]
    for cell in reattacks.values():
        assert cell["status"] == "done" and cell["n_success"] <= cell["n_correct"]
        assert cell["asr"] == pytest.approx(cell["n_success"] / cell["n_correct"])
        assert cell["n_correct"] == round(models[cell["immune"]]["clean_accuracy"] * 40)
    # measured: immune to FGSM, FGSM's fresh ASR 0.743 against 0.806 on the clear model
    assert reattacks["FGSM / FGSM"]["asr"] < results["attacks"]["FGSM"]["asr"]
    report = result.report.read_text()
    section = report.split("## Adversarial retraining (seed 001 Table 1; thesis 4.3, Tables 4.3-4.4)")[1]
    assert "| model | n train | n adversarial | test acc. | clean acc. | transferred acc. |" in section
    assert "### Fresh ASR: immune to A (rows), attacked by B (columns)" in section
    assert f"| immune to FGSM | {600 + results['retraining_sets']['FGSM']['n_fooled']} |" in section
    images = [line.split("](")[1].rstrip(")") for line in section.splitlines() if line.startswith("![")]
    assert images[0] == "figures/retraining-cross.png"
    data = (result.directory / images[0]).read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_the_immune_models_heatmaps_beside_the_clear_ones(
    finished: tuple[RunResult, Any], strict_json
) -> None:
    result, _ = finished
    results = strict_json(result.directory / "results.json")
    cells = results["retrained_heatmaps"]
    assert list(cells) == LABELS
    sample = np.load(result.directory / "arrays" / f"sample-{slug('sample')}.npz")
    clear = load_run_model(
        ModelSpec(epochs=4, max_train=800), dataset="digits", folder=result.directory, device=CPU
    ).model
    for label, cell in cells.items():
        attack = np.load(result.directory / "arrays" / f"attack-{slug(label)}.npz")
        index = np.flatnonzero(attack["successful"])
        assert cell["status"] == "done" and cell["n"] == len(index) == results["attacks"][label]["n_success"]
        arrays = np.load(result.directory / "arrays" / f"retrained_heatmap-{slug(label)}.npz")
        assert np.array_equal(arrays["index"], index)
        # the oracle: the heatmap study's functions on the clear model, for the same images
        maps = explanation_heatmaps(
            clear,
            torch.as_tensor(sample["x"][index]),
            torch.as_tensor(attack["x_adv"][index]),
            torch.as_tensor(sample["y"][index]),
            torch.as_tensor(attack["adversarial_prediction"][index]),
        )
        expected = spearman(maps.clean_original, maps.adversarial_original)
        assert np.allclose(arrays["clear_spearman"], expected, equal_nan=True)
        found = cell["numbers"]
        assert found["clear"]["spearman"]["mean"] == pytest.approx(np.nanmean(expected))
        assert found["immune"]["spearman"]["mean"] == pytest.approx(np.nanmean(arrays["immune_spearman"]))
        assert np.allclose(arrays["example_clear_clean"], maps.clean_original[:3], atol=1e-6)
        assert np.allclose(arrays["example_clear_adversarial"], maps.adversarial_original[:3], atol=1e-6)
        assert not np.allclose(arrays["example_immune_clean"], arrays["example_clear_clean"])
        assert set(found["immune"]) == {"spearman", "top_k_overlap", "perturbed_share", "changed_share"}
    section = result.report.read_text().split("### Heatmaps after retraining (seed 001 Fig. 3c/3e")[1]
    assert "| model | n | Spearman clear | Spearman immune | top-k clear | top-k immune |" in section
    images = [line.split("](")[1].rstrip(")") for line in section.splitlines() if line.startswith("![")]
    assert len(images) == len(LABELS) and all("retrained_heatmap-" in image for image in images)
    for image in images:
        data = (result.directory / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.mark.usefixtures("finished")
def test_arts_trainer_retrains_every_immune_model(trainer_calls: list[AdversarialTrainer]) -> None:
    assert len(trainer_calls) == len(LABELS)  # one fit per immune model, none for the clear one
    for trainer in trainer_calls:
        (attack,) = trainer.attacks
        assert trainer.ratio == 1.0 and type(attack).__name__ == "PrecomputedAttack"
        assert attack.estimator is not trainer.get_classifier()  # transferred: made on the clear model


def test_a_study_that_bypasses_arts_trainer_fails(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    def refused(self: AdversarialTrainer, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("AdversarialTrainer.fit was called")

    monkeypatch.setattr(AdversarialTrainer, "fit", refused)
    other = STUDY.replace("epochs = 3", "epochs = 1")  # not cached: each immune model must be trained
    result = run_evaluation(load_config(write_config(tmp_path, config_text(tmp_path / "out", other))))
    assert [(cell["kind"], cell["label"]) for cell in result.failed_cells] == [
        ("immune_model", label) for label in LABELS
    ]
    assert all(
        cell["error"] == "RuntimeError: AdversarialTrainer.fit was called" for cell in result.failed_cells
    )
    assert "reattacks" not in result.results
    assert "- model FGSM: RuntimeError: AdversarialTrainer.fit was called" in result.report.read_text()


def test_immune_models_are_cached_apart_and_never_over_the_clear_model(
    cache: Path, finished: tuple[RunResult, dict[str, str]]
) -> None:
    result, clear_files = finished
    assert file_digests(cache / "models") == clear_files  # the clear model's files untouched
    keys = [result.results["immune_models"][label]["training"]["cache_key"] for label in LABELS]
    assert len(set(keys)) == len(LABELS)  # one per attack
    retrained = sorted(p.name for p in (cache / "models" / "retrained").iterdir())
    assert retrained == sorted(f"{key}.{suffix}" for key in keys for suffix in ("json", "safetensors"))
    clear_stems = {name.rsplit(".", 1)[0] for name in clear_files}
    assert not clear_stems & set(keys)


def test_a_rerun_after_an_interrupt_recomputes_only_the_unfinished_cells(
    cache: Path,
    finished: tuple[RunResult, Any],
    trainer_calls: list[AdversarialTrainer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    strict_json,
    write_config,
) -> None:
    calls: list[str] = []
    interrupt = {"at": reattack_label("LRP-grad", "FGSM")}
    for name in ("run_set_cell", "run_immune_cell", "run_retrained_heatmap_cell", "run_reattack_cell"):
        real = getattr(retraining_study, name)

        def wrapper(study: Any, run: Any, label: Any, *args: Any, real: Any = real, name: str = name) -> Any:
            shown = label if name != "run_reattack_cell" else reattack_label(label, args[0].label)
            calls.append(f"{name}:{shown}")
            if shown == interrupt["at"]:
                raise KeyboardInterrupt
            return real(study, run, label, *args)

        monkeypatch.setattr(retraining_study, name, wrapper)
    path = write_config(tmp_path, config_text(tmp_path / "out"))
    trainer_calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(load_config(path))
    assert trainer_calls == []  # the immune models came from the cache the first run filled
    assert calls[-1] == "run_reattack_cell:LRP-grad / FGSM" and len(calls) == 2 + 3 + 2 + 2 + 1
    assert calls[4:6] == ["run_retrained_heatmap_cell:FGSM", "run_reattack_cell:FGSM / FGSM"]
    assert strict_json(tmp_path / "out" / "results.json")["complete"] is False

    calls.clear()
    interrupt["at"] = None
    again = run_evaluation(load_config(path))
    assert calls == ["run_reattack_cell:LRP-grad / FGSM", "run_reattack_cell:LRP-grad / LRP-grad"]
    assert again.results["complete"] is True
    for kind in ("retraining_sets", "immune_models", "retrained_heatmaps", "reattacks"):
        assert untimed(again.results[kind]) == untimed(finished[0].results[kind]), kind


# -------------------------------------------------------------------------------------------------
# the library functions


def test_retraining_sets_of_both_protocols() -> None:
    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 2, 2) / 20
    y = np.arange(5)
    x_adv = x[:3] + 0.01
    fooled = np.array([True, False, True])
    images, labels, counterparts = retraining_set("supplement", x, y, x_adv, fooled)
    assert np.array_equal(images, np.concatenate([x, x[[0, 2]]])) and labels.tolist() == [0, 1, 2, 3, 4, 0, 2]
    assert np.array_equal(counterparts, np.concatenate([x, x_adv[[0, 2]]]))
    images, labels, counterparts = retraining_set("transfer", x, y, x_adv, fooled)
    assert np.array_equal(images, x) and labels.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(counterparts[:3], x_adv) and np.array_equal(counterparts[3:], x[3:])
    assert np.array_equal(x_adv, x[:3] + 0.01)  # the caller's arrays untouched
    with pytest.raises(ValueError, match="protocol must be one of 'supplement', 'transfer'"):
        retraining_set("both", x, y, x_adv, fooled)
    with pytest.raises(ValueError, match=r"x_adv: expected the adversarial images .* first N <= 2 images"):
        retraining_set("transfer", x[:2], y[:2], x_adv, fooled)


def test_the_precomputed_attack_answers_only_its_own_images(digits_cnn: nn.Module) -> None:
    from xaiadv.bridge.registry import art_classifier

    x = np.zeros((3, 1, 8, 8), dtype=np.float32)
    attack = precomputed_attack(art_classifier(digits_cnn, (1, 8, 8), (0.0, 1.0), None), x, x + 0.5)
    assert np.array_equal(attack.generate(x.copy()), x + 0.5)
    with pytest.raises(ValueError, match=r"x: this attack holds the counterparts of \(3, 1, 8, 8\)"):
        attack.generate(x[:2])
    with pytest.raises(ValueError, match="counterparts: expected one per image"):
        precomputed_attack(attack.estimator, x, x[:2])


def test_transfer_retraining_is_seeded_and_leaves_the_clear_model(digits_cnn: nn.Module, digits: Any) -> None:
    x, y = digits.x_train[:200].numpy(), digits.y_train[:200].numpy()
    counterparts = x.copy()
    counterparts[:20] = np.clip(x[:20] + 0.1, 0, 1)
    before = {k: v.clone() for k, v in digits_cnn.state_dict().items()}
    retrained = [
        adversarial_retrain(
            _copy(digits_cnn), x, y, counterparts, clear=digits_cnn, lr=1e-4, epochs=1, batch_size=50, seed=3
        ).state_dict()
        for _ in range(2)
    ]
    assert all(torch.equal(retrained[0][k], retrained[1][k]) for k in before)  # the same seed, the same model
    assert any(not torch.equal(retrained[0][k], before[k]) for k in before)
    assert all(torch.equal(v, before[k]) for k, v in digits_cnn.state_dict().items())  # clear untouched
    assert not digits_cnn.training
    with pytest.raises(ValueError, match="model: expected a copy of the clear model"):
        adversarial_retrain(digits_cnn, x, y, counterparts, clear=digits_cnn, lr=1e-4, epochs=1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        adversarial_retrain(_copy(digits_cnn), x, y, counterparts, clear=digits_cnn, lr=0.0, epochs=1)


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def test_load_or_retrain_keys_caches_and_checks(digits_cnn: nn.Module, tmp_path: Path) -> None:
    calls: list[nn.Module] = []

    def retrain(model: nn.Module) -> nn.Module:
        calls.append(model)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return model

    retraining = {"attack": "FGSM", "epochs": 1}
    first = load_or_retrain(digits_cnn, "abc", retraining, retrain, cache_dir=tmp_path)
    assert calls[0] is not digits_cnn  # a copy is retrained
    second = load_or_retrain(digits_cnn, "abc", retraining, retrain, cache_dir=tmp_path)
    assert len(calls) == 1 and first.key == second.key == retrained_key("abc", retraining)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True)
    )
    assert not torch.equal(next(first.model.parameters()), next(digits_cnn.parameters()))
    assert first.path == tmp_path / "models" / "retrained" / f"{first.key}.safetensors"
    assert retrained_key("abc", {**retraining, "attack": "IFGSM"}) != first.key
    assert retrained_key("abd", retraining) != first.key  # other clear weights
    manifest = first.path.with_suffix(".json")
    manifest.write_text(manifest.read_text().replace('"FGSM"', '"IFGSM"'))
    with pytest.raises(ValueError, match="holds another retraining than the requested"):
        load_or_retrain(digits_cnn, "abc", retraining, retrain, cache_dir=tmp_path)


def test_training_rows_are_seeded_and_bounded() -> None:
    rows = training_rows(100, 30, seed=1)
    assert len(set(rows.tolist())) == 30 and np.array_equal(rows, training_rows(100, 30, seed=1))
    with pytest.raises(ValueError, match="clean_samples: 101 is more than the 100 training images"):
        training_rows(100, 101, seed=1)


def test_a_training_set_smaller_than_clean_samples_is_taken_whole() -> None:
    x_train = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    run = SimpleNamespace(
        data=SimpleNamespace(x_train=x_train, y_train=np.arange(50)), config=SimpleNamespace(seed=2)
    )
    x, y = retraining_study._training_images(RetrainingStudy(train_samples=20, clean_samples=80), run)
    assert sorted(y.tolist()) == list(range(50)) and np.array_equal(x[:, 0, 0, 0], y)  # all 50, in pairs
    x, y = retraining_study._training_images(RetrainingStudy(train_samples=20, clean_samples=30), run)
    assert np.array_equal(y, training_rows(50, 30, seed=2))  # a larger set: the seeded draw


def test_the_cross_table_figure_checks_its_grids(tmp_path: Path) -> None:
    grids = {"fresh ASR": [[0.5, None], [1.0, 0.0]]}
    path = plot_value_grids(["clear", "immune to A"], ["A", "B"], grids, tmp_path / "grid.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match=r"grids\['fresh ASR'\] must hold 2 rows of 2 values each"):
        plot_value_grids(["clear", "immune to A"], ["A", "B"], {"fresh ASR": [[0.5]]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"must hold values in \[0, 1\]"):
        plot_value_grids(["clear"], ["A"], {"ASR": [[1.5]]}, tmp_path / "bad.png")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"protocol": "both"}, "protocol must be one of"),
        ({"train_samples": 0}, "train_samples must be an int > 0"),
        ({"train_samples": 20, "clean_samples": 10}, "train_samples: the attacked images are among"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"attacks": "FGSM"}, "attacks: expected a list of attack labels"),
        ({"k": 0}, "k must be an int > 0"),
        ({"examples": 0}, "examples must be an int > 0"),
    ],
)
def test_bad_parameters_name_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetrainingStudy(**params)


def test_the_protocols_learning_rates() -> None:
    assert RetrainingStudy().learning_rate == 1e-3
    assert RetrainingStudy(protocol="transfer").learning_rate == 1e-4
    assert RetrainingStudy(protocol="transfer", lr=0.01).learning_rate == 0.01


def test_a_config_naming_an_unknown_attack_or_the_clear_label_is_refused(
    tmp_path: Path, write_config
) -> None:
    study = STUDY + 'attacks = ["PGD"]\n'
    with pytest.raises(ConfigError, match=r"studies\[0\]\.attacks: \['PGD'\] are not attack labels"):
        load_config(write_config(tmp_path, config_text(tmp_path / "out", study)))
    text = config_text(tmp_path / "out").replace('label = "FGSM"', f'label = "{CLEAR}"')
    with pytest.raises(ConfigError, match="attacks: the label 'clear model' names the clear model's row"):
        load_config(write_config(tmp_path, text))


# -------------------------------------------------------------------------------------------------
# the shipped config


def test_the_shipped_config_retrains_against_the_issues_four_attacks() -> None:
    config = load_config(SHIPPED)
    assert (config.dataset, config.fallback) == ("fashion_mnist", "digits")
    assert [spec.label for spec in config.attacks] == ["FGSM", "IFGSM", "LRP-grad", "LRP-flip"]
    (study,) = config.studies
    assert isinstance(study, RetrainingStudy) and study.protocol == "supplement" and study.attacks == ()


@pytest.mark.slow
@pytest.mark.usefixtures("cache")
def test_the_shipped_fashion_mnist_config_makes_immune_models(
    tmp_path: Path, strict_json, write_config
) -> None:
    text = SHIPPED.read_text().replace('output = "runs/retraining"', f'output = "{tmp_path / "out"}"')
    result = run_evaluation(load_config(write_config(tmp_path, text)))
    check_the_shipped_results(strict_json(result.directory / "results.json"), result.directory)


#: Measured once (28 min 33 s on 2 cores shared with three other engineers' runs): each immune model's
#: accuracy on its own attack's transferred test set (clear model: 0.32, 0.125, 0, 0.03), floored below.
OWN_TRANSFERRED = {
    "FGSM": (0.585, 0.55),
    "IFGSM": (0.58, 0.55),
    "LRP-grad": (0.8, 0.75),
    "LRP-flip": (0.845, 0.8),
}


def check_the_shipped_results(results: dict[str, Any], directory: Path) -> None:
    """The shipped config's figures against what was measured (seed 001 Table 1's reading: the immune model
    classifies its attack's transferred examples, keeps its clean accuracy, and a fresh FGSM / IFGSM
    succeeds less often on it)."""
    assert results["data"]["fell_back"] is False and results["complete"] is True
    attacks, models = results["attacks"], results["immune_models"]
    clear = models[CLEAR]
    assert clear["test_accuracy"] > 0.84  # measured 0.8539
    for label, (measured, floor) in OWN_TRANSFERRED.items():
        own = models[label]["transferred"][label]["accuracy"]
        assert own >= floor and own > clear["transferred"][label]["accuracy"] + 0.2, (label, own, measured)
        assert models[label]["test_accuracy"] > 0.83, label  # measured 0.842 .. 0.863
    reattacks = results["reattacks"]
    # measured on two machines (their CPUs train other weights from the same seed): FGSM 0.423 and 0.474 on
    # its immune model against 0.634 and 0.624 on the clear one, IFGSM 0.692 and 0.67 against 0.857 and 0.867
    for label in ("FGSM", "IFGSM"):
        assert reattacks[f"{label} / {label}"]["asr"] < attacks[label]["asr"] - 0.1, label
    heatmaps = results["retrained_heatmaps"]
    assert list(heatmaps) == list(OWN_TRANSFERRED)
    for label, cell in heatmaps.items():
        assert cell["n"] == attacks[label]["n_success"] > 100
        for model in ("clear", "immune"):
            assert -1 <= cell["numbers"][model]["spearman"]["mean"] <= 1
        figure = (directory / "figures" / f"retrained_heatmap-{slug(label)}.png").read_bytes()
        assert figure.startswith(PNG_SIGNATURE) and len(figure) > 1000
