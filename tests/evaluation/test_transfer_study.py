"""The black-box transfer study (seed 002 section 4.1, Tables 1-5): end to end on digits with two small
models, resumed after an interrupt, a detector that cannot be fitted, its checks, the typed library
function against a hand-written FGSM, and the shipped Fashion-MNIST config (slow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from xaiadv.bridge.art import IDefenderDetector
from xaiadv.bridge.registry import art_classifier
from xaiadv.evaluation import transfer_study
from xaiadv.evaluation.config import ConfigError, load_config
from xaiadv.evaluation.models import load_or_train, model_e, model_f
from xaiadv.evaluation.run import RunResult, run_evaluation
from xaiadv.evaluation.rundir import slug
from xaiadv.evaluation.studies import study_registry
from xaiadv.evaluation.transfer_study import (
    PAPER_TABLE_5,
    Network,
    TransferStudy,
    paper_auc,
    transfer_attack,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHIPPED = Path(__file__).resolve().parents[2] / "evaluation" / "transfer.toml"
SUBSTITUTE = Network(architecture="E", epochs=10, max_train=1000)
TARGET = Network(architecture="reference_cnn", width=8, epochs=10, max_train=1000)
STUDY = """
[[studies]]
name = "xaiadv:TransferStudy"
substitute = { architecture = "E", epochs = 10, max_train = 1000 }
target = { architecture = "reference_cnn", width = 8, epochs = 10, max_train = 1000 }
strengths = [0.1, 0.3]
detectors = [
  "I-defender",
  { name = "xaiadv:KNNDetector", label = "kNN" },
  { name = "xaiadv:IDefenderDetector", label = "too many components", params = { n_components = 500 } },
]
"""


def config_text(output: Path, study: str = STUDY) -> str:
    return (
        f'output = "{output}"\nseed = 0\nbatch_size = 64\n'
        '[data]\ndataset = "digits"\nsamples = 80\nfit_samples = 600\n'
        "[model]\nepochs = 2\nmax_train = 400\nwidth = 8\n"
        '[[attacks]]\nname = "art:FastGradientMethod"\nlabel = "FGSM"\nparams = { eps = 0.1 }\n'
        '[[detectors]]\nname = "xaiadv:IDefenderDetector"\nlabel = "I-defender"\n'
        "params = { n_components = 1 }\n" + study
    )


@pytest.fixture(scope="module")
def finished(cache: Path, tmp_path_factory: pytest.TempPathFactory, write_config) -> RunResult:
    folder = tmp_path_factory.mktemp("run")
    return run_evaluation(load_config(write_config(folder, config_text(folder / "out"))))


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> np.ndarray:
    """Seed 002 eq. 1 by hand: x + eps * sign(grad of the cross-entropy), clipped to [0, 1]."""
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    return (x + eps * x.grad.sign()).clamp(0.0, 1.0).detach().numpy()


def test_the_study_is_registered_and_defaults_to_the_papers_setting() -> None:
    study = study_registry()["xaiadv:TransferStudy"]()
    assert isinstance(study, TransferStudy) and study.name == "xaiadv:TransferStudy"
    # seed 002 4.1: "Attackers generated adversarial examples using model E, and used them to attack model F"
    assert study.substitute.architecture == "E" and study.target.architecture == "F"
    assert study.attack == "art:FastGradientMethod" and study.strength == "eps"
    assert study.strengths == (0.1, 0.15, 0.2, 0.25, 0.3) == tuple(PAPER_TABLE_5)
    assert PAPER_TABLE_5 == {0.1: 0.9302, 0.15: 0.9587, 0.2: 0.9722, 0.25: 0.9807, 0.3: 0.9850}
    assert study.to_dict()["target"] == {
        "architecture": "F",
        "epochs": 5,
        "max_train": None,
        "width": 32,
        "seed": 0,
        "output": "logits",
    }


def test_the_papers_auc_is_printed_beside_fgsm_at_its_strengths_only() -> None:
    assert paper_auc("art:FastGradientMethod", "eps", 0.25) == 0.9807
    assert paper_auc("foolbox:FGSM", "epsilons", 0.1) == paper_auc("torchattacks:FGSM", "eps", 0.1) == 0.9302
    assert paper_auc("art:FastGradientMethod", "eps", 0.05) is None
    assert paper_auc("art:BasicIterativeMethod", "eps", 0.1) is None
    assert paper_auc("art:FastGradientMethod", "eps_step", 0.1) is None


def test_models_e_and_f_have_table_1s_layers() -> None:
    e, f = model_e((1, 28, 28), 10), model_f((1, 28, 28), 10)
    assert [type(m).__name__ for m in e] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in (e.fc1, e.fc2, e.fc3)] == [
        (784, 200),
        (200, 200),
        (200, 10),
    ]
    assert (f.conv1.out_channels, f.conv1.kernel_size, f.conv1.stride) == (64, (8, 8), (2, 2))
    assert (f.conv2.out_channels, f.conv2.kernel_size, f.conv2.stride) == (128, (6, 6), (2, 2))
    assert f.fc.in_features == 128 * 5 * 5 and f(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"input_shape: model F needs H, W >= 11"):
        model_f((1, 8, 8), 10)


def test_a_log_softmax_output_keeps_the_classifier_its_gradients_and_its_layer_names() -> None:
    torch.manual_seed(0)
    f = model_f((1, 28, 28), 10)
    wrapped = Network(architecture="F", output="log_softmax").with_output(f)
    assert [name for name, _ in wrapped.named_children()] == [
        "conv1",
        "relu1",
        "conv2",
        "relu2",
        "flatten",
        "fc",
        "log_softmax",
    ]
    assert wrapped.fc is f.fc  # the same weights: a detector's layer = "fc" is the logits' layer
    x = torch.rand(6, 1, 28, 28, requires_grad=True)
    y = torch.arange(6)
    torch.testing.assert_close(wrapped(x), torch.log_softmax(f(x), 1))
    (grad_logits,) = torch.autograd.grad(torch.nn.functional.cross_entropy(f(x), y), x)
    (grad_wrapped,) = torch.autograd.grad(torch.nn.functional.cross_entropy(wrapped(x), y), x)
    torch.testing.assert_close(grad_wrapped, grad_logits)  # log_softmax is idempotent
    e = model_e((1, 28, 28), 10)
    assert Network(output="logits").with_output(e) is e
    assert Network(output="log_softmax").key("digits") == Network().key("digits") + "+log_softmax"


def test_the_transfer_cells_hold_the_target_asr_of_a_hand_written_fgsm(
    finished: RunResult, strict_json
) -> None:
    results = strict_json(finished.directory / "results.json")
    assert list(results["transfers"]) == ["eps=0.1", "eps=0.3"]
    sample = np.load(finished.directory / "arrays" / f"sample-{slug('sample')}.npz")
    x, y = torch.as_tensor(sample["x"]), torch.as_tensor(sample["y"])
    substitute = load_or_train(SUBSTITUTE.train_config("digits")).model
    target = load_or_train(TARGET.train_config("digits")).model
    with torch.no_grad():
        correct = target(x).argmax(1).numpy() == y.numpy()
    asr = {}
    for label, cell in results["transfers"].items():
        eps = cell["value"]
        assert cell["status"] == "done" and cell["substitute"] == "E" and cell["target"] == "reference_cnn"
        assert cell["paper_auc"] == PAPER_TABLE_5[eps] and cell["undefined"] == {}
        arrays = np.load(finished.directory / "arrays" / f"transfer-{slug(label)}.npz")
        oracle = fgsm(substitute, x, y, eps)
        np.testing.assert_allclose(arrays["x_adv"], oracle, atol=1e-6)
        with torch.no_grad():
            fooled = target(torch.as_tensor(oracle)).argmax(1).numpy() != y.numpy()
        assert cell["n"] == 80 and cell["n_target_correct"] == int(correct.sum())
        assert cell["n_transferred"] == int((correct & fooled).sum())
        assert cell["asr"] == pytest.approx((correct & fooled).sum() / correct.sum())
        asr[eps] = cell["asr"]
    # measured 0.22 at eps 0.1 and 0.78 at 0.3: a stronger FGSM transfers more often
    assert 0.1 < asr[0.1] < asr[0.3] and asr[0.3] > 0.6


def test_the_detector_cell_scores_the_transferred_examples_on_the_target(
    finished: RunResult, strict_json
) -> None:
    results = strict_json(finished.directory / "results.json")
    cell = results["transfer_detectors"]["I-defender"]
    assert cell["status"] == "done" and cell["name"] == "xaiadv:IDefenderDetector" and cell["n_fit"] == 600
    arrays = np.load(finished.directory / "arrays" / f"transfer_detector-{slug('I-defender')}.npz")
    clean = arrays["clean_scores"]
    aucs = {}
    for label, row in cell["rows"].items():
        transfer = np.load(finished.directory / "arrays" / f"transfer-{slug(label)}.npz")
        correct = (
            transfer["target_clean"]
            == np.load(finished.directory / "arrays" / f"sample-{slug('sample')}.npz")["y"]
        )
        scores = arrays[f"scores_transfer-{slug(label)}"]
        transferred = transfer["transferred"]
        assert row["n"] == transferred.sum() == results["transfers"][label]["n_transferred"]
        assert row["n_clean"] == correct.sum() == cell["n_target_correct"]
        assert (row["auc"], row["auc_all"]) == pytest.approx(
            sklearn_aucs(clean[correct], scores, correct, transferred)
        )
        aucs[label] = row["auc"]
    # measured 0.94 at eps 0.1 and 0.97 at 0.3 on the target's 32-wide hidden state
    assert aucs["eps=0.1"] >= 0.85 and aucs["eps=0.3"] >= 0.9


def sklearn_aucs(
    clean: np.ndarray, adversarial: np.ndarray, correct: np.ndarray, transferred: np.ndarray
) -> tuple[float, float]:
    """scikit-learn's AUC of the target-correct ``clean`` scores against the transferred examples' and
    against every target-correct sample's example (the study's auc and auc_all)."""

    def auc(positive: np.ndarray) -> float:
        truth = np.repeat([0, 1], [len(clean), len(positive)])
        return roc_auc_score(truth, np.concatenate([clean, positive]))

    return auc(adversarial[transferred]), auc(adversarial[correct])


def test_the_true_class_reading_scores_each_sample_under_its_label(finished: RunResult, strict_json) -> None:
    """Where the target predicts the label the true-class score is the detector's own (the same mixture);
    where a transferred example fools it, another mixture's; its AUCs equal scikit-learn's on the arrays."""
    results = strict_json(finished.directory / "results.json")
    cell = results["transfer_detectors"]["I-defender"]
    assert cell["true_class"] is True
    arrays = np.load(finished.directory / "arrays" / f"transfer_detector-{slug('I-defender')}.npz")
    y = np.load(finished.directory / "arrays" / f"sample-{slug('sample')}.npz")["y"]
    clean, clean_true = arrays["clean_scores"], arrays["clean_true_class_scores"]
    for label, row in cell["rows"].items():
        transfer = np.load(finished.directory / "arrays" / f"transfer-{slug(label)}.npz")
        correct, transferred = transfer["target_clean"] == y, transfer["transferred"]
        np.testing.assert_allclose(clean_true[correct], clean[correct])
        scores, true = (
            arrays[f"scores_transfer-{slug(label)}"],
            arrays[f"true_class_scores_transfer-{slug(label)}"],
        )
        kept = transfer["target_adversarial"] == y
        np.testing.assert_allclose(true[kept], scores[kept])
        assert transferred.any() and not np.allclose(true[transferred], scores[transferred])
        assert (row["auc_true_class"], row["auc_all_true_class"]) == pytest.approx(
            sklearn_aucs(clean_true[correct], true, correct, transferred)
        )
    knn = results["transfer_detectors"]["kNN"]
    assert knn["status"] == "done" and knn["true_class"] is False
    assert all("auc_true_class" not in row for row in knn["rows"].values())


def test_true_class_scores_are_the_label_s_mixture_under_scikit_learn(tiny_model) -> None:
    model = tiny_model("mlp", channels=1, side=8, classes=3, seed=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(90, 1, 8, 8, generator=generator)
    y = np.arange(90) % 3
    detector = IDefenderDetector(art_classifier(model, (1, 8, 8), (0.0, 1.0), None), n_components=1)
    detector.fit(x.numpy(), y)
    found = transfer_study.true_class_scores(detector, x[:20].numpy(), y[:20], 7)
    plugin = detector.plugin_
    hidden = plugin.hidden(x[:20]).numpy()
    oracle = [-plugin.mixtures_[label].score_samples(hidden[i : i + 1])[0] for i, label in enumerate(y[:20])]
    np.testing.assert_allclose(found, oracle, rtol=1e-9)
    assert transfer_study.true_class_scores(object(), x.numpy(), y, 7) is None


def test_a_detector_that_cannot_be_fitted_is_a_failed_cell_and_the_run_goes_on(
    finished: RunResult, strict_json
) -> None:
    results = strict_json(finished.directory / "results.json")
    assert results["complete"] is False
    assert results["failed_cells"] == [
        {
            "kind": "transfer_detector",
            "label": "too many components",
            "error": "ValueError: class 0 has 62 fitting samples; n_components=500 needs at least that many",
        }
    ]
    assert results["transfer_detectors"]["I-defender"]["status"] == "done"


def test_the_report_prints_table_5_beside_ours_with_a_roc_figure(finished: RunResult, strict_json) -> None:
    results = strict_json(finished.directory / "results.json")
    report = finished.report.read_text()
    section = report.split("## Black-box transfer (seed 002 section 4.1, Tables 1-5)")[1].split("\n## ")[0]
    assert (
        "| strength | n target-correct | n transferred | transfer ASR | substitute ASR | AUC I-defender | "
        "AUC all I-defender | AUC kNN | AUC all kNN | paper I-defender AUC (Table 5) |" in section
    )
    lines = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| eps=")}
    assert lines["| eps=0.1"].endswith("| 0.9302 |") and lines["| eps=0.3"].endswith("| 0.9850 |")
    rows = results["transfer_detectors"]["I-defender"]["rows"]
    worst = max((rows[k]["auc"] - PAPER_TABLE_5[v] for k, v in (("eps=0.1", 0.1), ("eps=0.3", 0.3))), key=abs)
    worst_all = max(
        (rows[k]["auc_all"] - PAPER_TABLE_5[v] for k, v in (("eps=0.1", 0.1), ("eps=0.3", 0.3))), key=abs
    )
    gap = f"I-defender: largest gap to the paper's I-defender AUC (ours - paper): AUC {worst:+.4f}, AUC all "
    assert f"{gap}{worst_all:+.4f}." in section
    true = section.split("Scored under the TRUE class's mixture")[1]
    assert "| strength | AUC I-defender | AUC all I-defender | paper I-defender AUC (Table 5) |" in true
    assert "kNN" not in true.split("\n\n")[1]  # no per-class likelihoods: no true-class column
    true_rows = {
        line.split(" | ")[0]: line.split(" | ") for line in true.splitlines() if line.startswith("| eps=")
    }
    assert true_rows["| eps=0.1"][1] == f"{rows['eps=0.1']['auc_true_class']:.3g}"
    assert "I-defender (true class): largest gap to the paper's I-defender AUC (ours - paper): AUC " in true
    assert "- too many components: ValueError: class 0 has 62 fitting samples" in section
    images = [line.split("](")[1].rstrip(")") for line in section.splitlines() if line.startswith("![")]
    assert len(images) == 2  # one ROC figure per fitted detector
    for image in images:
        data = (finished.directory / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_a_rerun_after_an_interrupt_recomputes_only_the_unfinished_cells(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    path = write_config(tmp_path, config_text(tmp_path / "out"))
    calls: list[str] = []
    interrupt = {"at": 0.3}
    real_transfer, real_detector = transfer_study.run_transfer_cell, transfer_study.run_transfer_detector_cell

    def transfer(study: Any, run: Any, value: float) -> Any:
        calls.append(f"transfer {value}")
        if value == interrupt["at"]:
            raise KeyboardInterrupt
        return real_transfer(study, run, value)

    def detector(study: Any, run: Any, spec: Any, *args: Any) -> Any:
        calls.append(f"detector {spec.label}")
        return real_detector(study, run, spec, *args)

    monkeypatch.setattr(transfer_study, "run_transfer_cell", transfer)
    monkeypatch.setattr(transfer_study, "run_transfer_detector_cell", detector)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(load_config(path))
    assert calls == ["transfer 0.1", "transfer 0.3"]

    calls.clear()
    interrupt["at"] = None
    result = run_evaluation(load_config(path))
    assert calls == ["transfer 0.3", "detector I-defender", "detector kNN", "detector too many components"]
    assert [cell["status"] for cell in result.results["transfers"].values()] == ["done", "done"]

    calls.clear()
    again = run_evaluation(load_config(path))
    assert calls == ["detector too many components"]  # only the failed cell is retried
    for kind in ("transfers", "transfer_detectors"):
        assert again.results[kind] == result.results[kind]


def test_transfer_attack_never_takes_a_gradient_of_the_target() -> None:
    torch.manual_seed(0)
    substitute, target = model_e((1, 8, 8), 10).eval(), model_e((1, 8, 8), 10).eval()
    backward_calls = []
    handle = target.register_full_backward_hook(lambda *args: backward_calls.append(args))
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    before = x.clone()
    try:
        found = transfer_attack(
            substitute, target, x, y, attack="art:FastGradientMethod", params={"eps": 0.2}, batch_size=5
        )
    finally:
        handle.remove()
    assert backward_calls == [] and all(p.grad is None for p in target.parameters())
    assert torch.equal(x, before)
    np.testing.assert_allclose(found.x_adv, fgsm(substitute, x, y, 0.2), atol=1e-6)
    with torch.no_grad():
        assert np.array_equal(
            found.target_adversarial, target(torch.as_tensor(found.x_adv)).argmax(1).numpy()
        )
        assert np.array_equal(found.substitute_clean, substitute(x).argmax(1).numpy())
    assert np.array_equal(
        found.transferred(y.numpy()),
        (found.target_clean == y.numpy()) & (found.target_adversarial != y.numpy()),
    )
    with pytest.raises(ValueError, match=r"y: expected 12 labels"):
        transfer_attack(substitute, target, x, y[:3], attack="art:FastGradientMethod", params={"eps": 0.2})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strengths": []}, r"strengths: expected a non-empty list"),
        ({"strengths": [0.1, 0.1]}, r"strengths: each value once"),
        ({"strengths": [0.1, -1]}, r"strengths: expected a non-empty list of finite numbers > 0"),
        ({"params": {"eps": 0.2}}, r"params: 'eps' is set by strengths"),
        ({"attack": "art:NoSuchAttack"}, r"attack: unknown attack 'art:NoSuchAttack'"),
        (
            {"substitute": {"architecture": "G"}},
            r"substitute.architecture: expected one of reference_cnn, E, F",
        ),
        ({"target": {"epochs": 0}}, r"target.epochs: expected an integer >= 1"),
        ({"target": {"layers": 3}}, r"target: unknown keys \['layers'\]"),
        ({"target": {"output": "softmax"}}, r"target.output: expected one of \['logits', 'log_softmax'\]"),
        ({"detectors": [3]}, r"detectors: expected a list of detector labels, names or tables"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransferStudy(**kwargs)


def test_the_config_refuses_unknown_detectors_and_refused_parameters_before_any_work(
    isolated: Path, tmp_path: Path, write_config
) -> None:
    unknown = STUDY.replace('"I-defender",', '"I-defendr",')
    with pytest.raises(ConfigError, match=r"detectors: \['I-defendr'\] are neither labels of this run's"):
        load_config(write_config(tmp_path / "a", config_text(tmp_path / "out", unknown)))
    wrong_layer = STUDY.replace("n_components = 500", 'layer = "fc"')
    with pytest.raises(ConfigError, match=r"detectors: too many components: layer"):
        load_config(write_config(tmp_path / "b", config_text(tmp_path / "out", wrong_layer)))
    bad_attack = STUDY.replace("strengths = [0.1, 0.3]", "strengths = [0.1]\nparams = { targetted = true }")
    with pytest.raises(ConfigError, match=r"params: .*targetted"):
        load_config(write_config(tmp_path / "c", config_text(tmp_path / "out", bad_attack)))
    assert not (isolated / "models").exists()  # nothing trained


@pytest.mark.slow
def test_the_shipped_fashion_mnist_config_reaches_the_papers_auc(tmp_path: Path, write_config) -> None:
    config = load_config(SHIPPED)
    assert config.dataset == "fashion_mnist"
    (study,) = config.studies
    assert (study.substitute.architecture, study.target.architecture) == ("E", "F")
    text = SHIPPED.read_text().replace('output = "runs/transfer"', f'output = "{tmp_path / "out"}"')
    result = run_evaluation(load_config(write_config(tmp_path, text)))
    assert result.results["data"]["fell_back"] is False and result.results["complete"] is True
    transfers = result.results["transfers"]
    assert [cell["value"] for cell in transfers.values()] == list(PAPER_TABLE_5)
    asr = [cell["asr"] for cell in transfers.values()]
    assert asr == sorted(asr) and asr[0] > 0.1
    check_the_shipped_results(result.results)


def check_the_shipped_results(results: dict[str, Any]) -> None:
    """transfer.toml's figures against those measured (3 min 39 s cold on 2 idle cores, training included).

    Deployed (scored under the predicted class) I-defender falls short of Table 5: logits 0.747 .. 0.957,
    log-softmax 0.783 .. 0.958 against 0.930 .. 0.985 (gap -0.147 at eps 0.1, -0.027 at 0.3). Scored under
    the true class, the log-softmax reading over all examples is within 0.03 at every strength (0.917, 0.974,
    0.991, 0.997, 0.999: gaps -0.013 .. +0.019), the issue's target; floors a little below the rest."""
    transfers = results["transfers"]
    assert [cell["value"] for cell in transfers.values()] == list(PAPER_TABLE_5)
    asr = [cell["asr"] for cell in transfers.values()]
    assert asr == sorted(asr) and asr[0] > 0.55  # measured 0.621 .. 0.984
    detectors = results["transfer_detectors"]
    floors = {  # per reading: (detector, column) -> a floor per strength
        ("I-defender (logits)", "auc"): (0.73, 0.84, 0.90, 0.93, 0.945),
        ("I-defender (log-softmax)", "auc"): (0.77, 0.85, 0.90, 0.93, 0.945),
        ("I-defender (logits)", "auc_true_class"): (0.89, 0.95, 0.97, 0.98, 0.985),
    }
    below = {
        (label, column, strength): detectors[label]["rows"][strength][column]
        for (label, column), per_strength in floors.items()
        for strength, floor in zip(transfers, per_strength, strict=True)
        if detectors[label]["rows"][strength][column] < floor
    }
    assert below == {}
    log_softmax = detectors["I-defender (log-softmax)"]["rows"]
    gaps = {
        strength: log_softmax[strength]["auc_all_true_class"] - cell["paper_auc"]
        for strength, cell in transfers.items()
    }
    assert {strength: abs(gap) <= 0.03 for strength, gap in gaps.items()} == dict.fromkeys(transfers, True)
