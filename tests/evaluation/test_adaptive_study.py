"""The detector study's adaptive column on digits: end to end in a run, resumed after an interrupt, the
sanity warnings (each made to fire and not to fire), the settings' validation and the gray-box setting."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.evaluation import detector_study
from xaiadv.evaluation.adaptive_study import (
    QUOTE,
    AdaptiveSettings,
    adaptive_cell,
    adaptive_scorer,
    adaptive_weaker,
    attack_numbers,
    bypass_not_growing,
    gradients_vanish,
    gray_box_bypass,
    sanity_warnings,
    unbounded_short,
)
from xaiadv.evaluation.config import ConfigError, load_config
from xaiadv.evaluation.detector_study import DetectorStudy
from xaiadv.evaluation.run import RunResult, cell_count, run_evaluation
from xaiadv.evaluation.rundir import RunDirectory
from xaiadv.plugins.adaptive import AdaptiveConfig
from xaiadv.plugins.detectors import IDefender

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE = """output = "{output}"
seed = 0
batch_size = 64
[data]
dataset = "digits"
samples = 60
fit_samples = 400
[model]
epochs = 4
max_train = 800

[[attacks]]
name = "torchattacks:PGD"
label = "PGD"
params = {{ eps = 0.25, alpha = 0.05, steps = 5, random_start = false }}

[[detectors]]
name = "xaiadv:IDefenderDetector"
label = "I-defender"
params = {{ n_components = 2 }}
"""
MORE_DETECTORS = """
[[detectors]]
name = "xaiadv:KNNDetector"
label = "kNN (DW-kNN)"
params = { weighting = "distance" }

[[detectors]]
name = "art:BinaryInputDetector"
label = "ART binary input"
train_attack = "art:FastGradientMethod"
train_params = { eps = 0.1 }
train_samples = 200
"""
STUDY = '\n[[studies]]\nname = "xaiadv:DetectorStudy"\nadaptive = {}\n'


@pytest.fixture(scope="module")
def finished(cache: Path, tmp_path_factory: pytest.TempPathFactory, write_config) -> RunResult:
    folder = tmp_path_factory.mktemp("adaptive")
    adaptive = "{ eps = [0.1, 0.2], max_iter = 20, search_steps = 3, samples = 40 }"
    text = BASE.format(output=folder / "out") + MORE_DETECTORS + STUDY.replace("{}", adaptive)
    return run_evaluation(load_config(write_config(folder, text)))


def test_the_adaptive_column_beats_the_blind_attack_on_i_defender(finished: RunResult, strict_json) -> None:
    results = strict_json(finished.directory / "results.json")
    assert results["complete"] is True
    cells = results["adaptives"]
    budgets = ["Linf 0.1", "Linf 0.2", "Linf unbounded"]
    detectors = ["I-defender", "kNN (DW-kNN)", "ART binary input"]
    assert list(cells) == [f"{d} | {b}" for d in detectors for b in budgets]
    for cell in cells.values():
        assert cell["status"] == "done" and cell["n"] == 40 and cell["norm"] == "Linf"
        for numbers in (cell["non_adaptive"], cell["adaptive"] or {"bypass_rate": 0.0}):
            assert 0.0 <= numbers["bypass_rate"] <= 1.0
    idefender = {budget: cells[f"I-defender | {budget}"] for budget in budgets}
    assert all(
        cell["reason"] is None and cell["vanishing_gradient_share"] == 0.0 for cell in idefender.values()
    )
    plain, adaptive = (
        idefender["Linf 0.2"][attack]["bypass_rate"] for attack in ("non_adaptive", "adaptive")
    )
    assert adaptive >= 0.8 and adaptive >= plain + 0.2, (adaptive, plain)  # measured 0.875 vs 0.575
    assert idefender["Linf unbounded"]["eps"] == 1.0
    assert idefender["Linf unbounded"]["adaptive"]["bypass_rate"] >= 0.95  # measured 1.00 (blind: 0.00)
    assert 0.0 <= idefender["Linf 0.2"]["adaptive"]["auc"] <= 1.0
    peer = cells["ART binary input | Linf 0.2"]  # no differentiable score: non-adaptive numbers, a reason
    assert peer["adaptive"] is None and peer["vanishing_gradient_share"] is None
    assert peer["reason"].startswith("no differentiable score: art:BinaryInputDetector is trained by ART")
    assert 0.0 <= peer["non_adaptive"]["bypass_rate"] <= 1.0


def test_the_report_sets_the_columns_side_by_side_says_which_to_quote_and_warns(
    finished: RunResult, strict_json
) -> None:
    results = strict_json(finished.directory / "results.json")
    report = finished.report.read_text()
    section = report.split("### Adaptive evaluation: the attacker knows the detector")[1]
    assert QUOTE in section and "Carlini & Wagner 2017; Tramer et al. 2020" in QUOTE
    assert (
        "| budget | n | bypass non-adaptive | bypass adaptive | AUC non-adaptive | AUC adaptive |" in section
    )
    assert "| Linf 0.2 | 40 | 0.575 | 0.875 |" in section  # I-defender's row, as measured
    assert "no differentiable score: art:BinaryInputDetector" in section
    for detector in ("I-defender", "kNN (DW-kNN)"):
        cells = [cell for cell in results["adaptives"].values() if cell["detector"] == detector]
        body = section.split(f"#### {detector}")[1].split("####")[0]
        assert re.findall(r"\*\*Warning:\*\* (.*)\.", body) == sanity_warnings(cells)
    # DW-kNN through its exact gradient stalled unbounded at 0.675 (blind PGD 0.775) and the report warned;
    # through the BPDA surrogate: 1.00 (and 0.90 vs 0.60 at L-inf 0.2), no warning
    unbounded = results["adaptives"]["kNN (DW-kNN) | Linf unbounded"]
    assert unbounded["adaptive"]["bypass_rate"] >= 0.95, unbounded
    assert "**Warning:**" not in section.split("#### kNN")[1].split("####")[0]
    (image,) = re.findall(r"!\[bypass rate over eps\]\((figures/[^)]+)\)", section)
    data = (finished.directory / image).read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_a_rerun_after_an_interrupt_recomputes_only_the_unfinished_adaptive_cells(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    adaptive = "{ eps = [0.1, 0.2], max_iter = 5, search_steps = 1, samples = 10, unbounded = false }"
    path = write_config(tmp_path, BASE.format(output=tmp_path / "out") + STUDY.replace("{}", adaptive))
    calls: list[float] = []
    real = detector_study.adaptive_cell

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[5].eps)
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    interrupt = True
    monkeypatch.setattr(detector_study, "adaptive_cell", counted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(load_config(path))
    assert calls == [0.1, 0.2]
    calls.clear()
    interrupt = False
    first = run_evaluation(load_config(path))
    assert calls == [0.2] and first.results["complete"] is True
    calls.clear()
    again = run_evaluation(load_config(path))
    assert calls == [] and again.results["adaptives"] == first.results["adaptives"]


def test_a_detector_whose_score_has_no_gradient_gets_a_reason_and_its_blind_numbers(
    digits: Any, digits_cnn: nn.Module, digits_correct: Any
) -> None:
    class Counting:
        """A fitted detector of ours whose score_torch is refused (as KNNScore's uniform vote once was)."""

        threshold_ = 0.5
        input_shape_ = (1, 8, 8)

        def score_torch(self, x: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError("Counting has no differentiable score")

    scorer, reason = adaptive_scorer(Counting(), "unused")
    assert scorer is None and reason == (
        "no differentiable score: detector: Counting has no differentiable score; a detector-aware attack "
        "needs a differentiable score"
    )
    assert adaptive_scorer(None, "ART's peer") == (None, "ART's peer")
    x, y = digits_correct[0][:8], digits_correct[1][:8]

    def detect(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.abs(batch).reshape(len(batch), -1).sum(1)
        return scores, scores > 1e9  # flags nothing

    config = AdaptiveConfig(eps=0.3, eps_step=0.05, max_iter=10)
    record, arrays = adaptive_cell(digits_cnn, detect, None, x, y, config, batch_size=3)
    assert record["adaptive"] is None and record["vanishing_gradient_share"] is None
    blind = record["non_adaptive"]
    assert blind["bypass_rate"] == blind["misclassified"] > 0.5  # nothing flagged: every success bypasses
    assert float(np.abs(arrays["x_non_adaptive"] - x.numpy()).max()) <= 0.3 + 1e-6


def test_attack_numbers_say_why_a_number_is_null() -> None:
    numbers = attack_numbers(np.zeros(4, bool), np.zeros(4), np.zeros(4, bool), np.ones(4))
    assert numbers["bypass_rate"] == 0.0 and numbers["auc"] is None and numbers["tpr_at_5"] is None
    assert numbers["undefined"] == dict.fromkeys(("auc", "tpr_at_5"), "no misclassified adversarial example")
    flagged = np.array([True, False, False, True])
    numbers = attack_numbers(np.ones(4, bool), np.array([3.0, 0.0, 0.5, 2.0]), flagged, np.array([0.1, 0.2]))
    assert numbers["bypass_rate"] == 0.5 and numbers["auc"] == 0.75 and numbers["undefined"] == {}


# -------------------------------------------------------------------------------------------------
# the sanity checks, each firing and not


def test_the_adaptive_attack_doing_worse_than_the_blind_one_warns() -> None:
    assert adaptive_weaker("Linf 0.1", 0.6, 0.4).startswith("at Linf 0.1 the adaptive attack bypasses less")
    assert adaptive_weaker("Linf 0.1", 0.6, 0.58) is None  # within the tolerance
    assert adaptive_weaker("Linf 0.1", 0.4, 0.9) is None and adaptive_weaker("Linf 0.1", 0.4, None) is None


def test_a_bypass_rate_that_falls_with_eps_warns() -> None:
    message = bypass_not_growing("adaptive", [0.1, 0.2, 0.3], [0.5, 0.8, 0.6])
    assert message.startswith("the adaptive bypass rate falls from 0.80 at eps 0.2 to 0.60 at eps 0.3")
    assert bypass_not_growing("adaptive", [0.1, 0.2, 0.3], [0.5, 0.8, 0.78]) is None
    assert bypass_not_growing("adaptive", [0.1, 0.2], [0.5, None]) is None


def test_an_unbounded_budget_short_of_100_percent_warns() -> None:
    assert "bypasses only 0.70 (< 0.95)" in unbounded_short("adaptive", 0.7)
    assert unbounded_short("adaptive", 0.96) is None and unbounded_short("adaptive", None) is None


def test_vanishing_detector_gradients_warn() -> None:
    assert gradients_vanish(0.8).startswith("the detector score's gradient is zero or NaN on 80%")
    assert gradients_vanish(0.5) is None and gradients_vanish(None) is None


def test_sanity_warnings_read_a_detectors_cells() -> None:
    def cell(budget: str, eps: float, plain: float, adaptive: float, *, unbounded: bool = False) -> dict:
        return {
            "status": "done",
            "budget": budget,
            "eps": eps,
            "unbounded": unbounded,
            "vanishing_gradient_share": 0.9,
            "non_adaptive": {"bypass_rate": plain},
            "adaptive": {"bypass_rate": adaptive},
        }

    cells = [
        cell("Linf 0.1", 0.1, 0.2, 0.9),
        cell("Linf 0.2", 0.2, 0.5, 0.4),
        cell("u", 1.0, 1.0, 0.5, unbounded=True),
    ]
    warnings = sanity_warnings(cells)
    assert [w.split(" ")[:3] for w in warnings] == [
        ["the", "detector", "score's"],
        ["at", "Linf", "0.2"],
        ["at", "u", "the"],
        ["the", "unbounded", "adaptive"],
        ["the", "adaptive", "bypass"],
    ]
    healthy = [cell("Linf 0.1", 0.1, 0.2, 0.9), cell("u", 1.0, 1.0, 1.0, unbounded=True)]
    healthy[0]["vanishing_gradient_share"] = 0.0
    assert sanity_warnings(healthy) == []


# -------------------------------------------------------------------------------------------------
# the settings


def test_the_settings_and_their_budgets() -> None:
    assert DetectorStudy().adaptive is None
    study = DetectorStudy(adaptive={"eps": [0.5, 1.5], "norm": "L2"})
    assert study.adaptive == AdaptiveSettings(eps=(0.5, 1.5), norm="L2")
    assert study.adaptive.budgets((1, 8, 8), (0.0, 1.0)) == [
        ("L2 0.5", 0.5),
        ("L2 1.5", 1.5),
        ("L2 unbounded", 8.0),
    ]
    config = study.adaptive.config(0.5)
    assert config.norm == 2.0 and config.eps_step == pytest.approx(2.5 * 0.5 / 20) and config.max_iter == 20
    assert study.to_dict()["adaptive"]["eps"] == (0.5, 1.5)
    assert math.isinf(AdaptiveSettings().config(0.1).norm)


@pytest.mark.parametrize(
    ("adaptive", "message"),
    [
        (
            "{ eps = [0.2, 0.1] }",
            r"studies\[0\]\.adaptive\.eps: expected distinct budgets in ascending order",
        ),
        ("{ eps = [] }", r"studies\[0\]\.adaptive\.eps: expected a non-empty list"),
        ("{ eps = [0.0] }", r"studies\[0\]\.adaptive\.eps must be > 0"),
        ('{ norm = "L1" }', r"studies\[0\]\.adaptive\.norm must be one of 'Linf', 'L2'; got 'L1'"),
        ("{ max_iter = 0 }", r"studies\[0\]\.adaptive\.max_iter must be an int > 0"),
        ("{ epsilon = [0.1] }", r"studies\[0\]\.adaptive: unknown key\(s\) \['epsilon'\]; valid: eps, norm"),
        ("3", r"studies\[0\]\.adaptive: expected a table of"),
    ],
)
def test_bad_adaptive_settings_are_refused_when_the_config_loads(
    tmp_path: Path, adaptive: str, message: str, write_config
) -> None:
    path = write_config(tmp_path, BASE.format(output=tmp_path / "out") + STUDY.replace("{}", adaptive))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


# -------------------------------------------------------------------------------------------------
# the gray-box setting (seed 002 section 4.3, Tables 7-9)


def test_gray_box_crafted_on_a_source_model_is_judged_by_the_target(
    digits: Any, digits_cnn: nn.Module, digits_correct: Any, digits_trainer: Any
) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        source = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(384, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
    source = digits_trainer(source, digits)  # independently trained: another architecture and init
    source_detector = IDefender(source).fit_calibrated(digits.x_train, digits.y_train, fpr=0.05)
    target_detector = IDefender(digits_cnn).fit_calibrated(digits.x_train, digits.y_train, fpr=0.05)
    x, y = digits_correct[0][:40], digits_correct[1][:40]
    config = AdaptiveConfig(eps=0.3, eps_step=2.5 * 0.3 / 20, max_iter=20, search_steps=3)
    result = gray_box_bypass(source, source_detector, digits_cnn, target_detector, x, y, config=config)
    with torch.no_grad():
        misclassified = digits_cnn(result.x_adv).argmax(1) != y
    assert torch.equal(result.target_misclassified, misclassified)
    assert torch.equal(result.target_flagged, target_detector.detect(result.x_adv))
    assert float((result.x_adv - x).abs().max()) <= 0.3 + 1e-6
    white, gray = (float(t.float().mean()) for t in (result.source_bypassed, result.target_bypassed))
    # measured: white-box 0.975, gray-box 0.05 (the target misclassifies 0.425 of them): examples that stop
    # at the source's first bypass rarely carry over to another model's I-defender (seed 002 Tables 7-9)
    assert white >= 0.9 and gray <= white - 0.5, (white, gray)
    assert float(result.target_misclassified.float().mean()) >= 0.3


SHIPPED = Path(detector_study.__file__).with_name("adaptive.toml")
OUR_DETECTORS = ["spatial entropy", "I-defender ID-95", "kNN (DW-kNN)", "LRP signatures LS-95"]


def test_the_shipped_config_runs_the_adaptive_column_for_our_four_detectors() -> None:
    config = load_config(SHIPPED)
    assert (config.dataset, config.fallback) == ("fashion_mnist", "digits")
    assert [spec.label for spec in config.detectors] == OUR_DETECTORS
    study = next(study for study in config.studies if isinstance(study, DetectorStudy))
    assert study.adaptive == AdaptiveSettings(eps=(0.03, 0.1), samples=50)


@pytest.mark.slow
@pytest.mark.usefixtures("cache")
def test_the_shipped_config_bypasses_every_detector_at_ten_levels(
    tmp_path: Path, write_config, strict_json
) -> None:
    """Measured on Fashion-MNIST at L-inf 0.1 (the 2-thread demo model): adaptive bypass 0.96 / 0.96 / 0.90 /
    0.94 against the blind PGD's 0.66 / 0.52 / 0.56 / 0.58 (entropy, I-defender, DW-kNN, LRP signatures);
    unbounded 0.96-1.00. (On the earlier 1-thread model: 0.94 / 0.92 / 0.94 / 0.90 against 0.64-0.52.)"""
    text = SHIPPED.read_text().replace('output = "runs/adaptive"', f'output = "{tmp_path / "out"}"')
    result = run_evaluation(load_config(write_config(tmp_path, text)))
    cells = strict_json(result.directory / "results.json")["adaptives"]
    for detector in OUR_DETECTORS:
        at_ten = cells[f"{detector} | Linf 0.1"]
        plain, adaptive = (at_ten[attack]["bypass_rate"] for attack in ("non_adaptive", "adaptive"))
        assert adaptive >= 0.84 and adaptive >= plain + 0.2, (detector, adaptive, plain)
        assert cells[f"{detector} | Linf unbounded"]["adaptive"]["bypass_rate"] >= 0.9, detector


def test_each_detector_of_ours_is_fitted_once_in_its_own_cell_and_scores_as_fitted(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    """The detector cell and both budgets' adaptive cells read the one detector_fit cell's saved state
    (the oracle: the detector as fitted, in memory, scores the sample as the cell's reloaded one did);
    ART's trained peer has no state of ours and is fitted in each of its three cells. Every detector's
    cell of a budget reads that budget's one blind PGD."""
    adaptive = "{ eps = [0.1, 0.2], max_iter = 3, search_steps = 1, samples = 8, unbounded = false }"
    text = BASE.format(output=tmp_path / "out") + MORE_DETECTORS + STUDY.replace("{}", adaptive)
    config = load_config(write_config(tmp_path, text))
    fitted: dict[str, list[Any]] = {}
    real = detector_study.fit_detector_object

    def counted(spec: Any, *args: Any, **kwargs: Any) -> Any:
        detect, detector = real(spec, *args, **kwargs)
        fitted.setdefault(spec.label, []).append(detect)
        return detect, detector

    monkeypatch.setattr(detector_study, "fit_detector_object", counted)
    blind: list[float] = []
    real_blind = detector_study.blind_pgd
    monkeypatch.setattr(
        detector_study, "blind_pgd", lambda *a, **k: (blind.append(a[3].eps), real_blind(*a, **k))[1]
    )
    result = run_evaluation(config)
    assert result.results["complete"] is True
    assert blind == [0.1, 0.2]  # the non-adaptive PGD once per budget, not once per detector and budget
    assert list(result.results["adaptive_blinds"]) == ["Linf 0.1", "Linf 0.2"]
    assert {label: len(fits) for label, fits in fitted.items()} == {
        "I-defender": 1,
        "kNN (DW-kNN)": 1,
        "ART binary input": 3,
    }
    fits = result.results["detector_fits"]
    assert list(fits) == ["I-defender", "kNN (DW-kNN)"]
    assert fits["I-defender"]["n_fit"] == 400 and fits["I-defender"]["saved"]["config"]["n_components"] == 2
    directory = RunDirectory(result.directory)
    (sample,) = (result.directory / "arrays").glob("sample-*.npz")
    x = np.load(sample)["x"]
    for label in fits:
        scores = directory.load_arrays("detector", label)["clean_scores"]
        np.testing.assert_array_equal(scores, fitted[label][0](x)[0], err_msg=label)

    again = run_evaluation(config)  # every cell reused: nothing refitted
    assert again.results["detectors"] == result.results["detectors"]
    assert sum(map(len, fitted.values())) == 5


ID_99 = """
[[detectors]]
name = "xaiadv:IDefenderDetector"
label = "I-defender (ID-99)"
params = { n_components = 2, keep = 0.99 }
"""


def test_detectors_that_differ_only_in_their_threshold_share_one_fit(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    """ID-95 and ID-99 (keep only moves the threshold) are fitted once; ID-99's cell equals that of a run
    that fits ID-99 alone (the oracle), and its threshold is its own, not ID-95's."""
    fitted: list[str] = []
    real = detector_study.fit_detector_object

    def counted(spec: Any, *args: Any, **kwargs: Any) -> Any:
        fitted.append(spec.label)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(detector_study, "fit_detector_object", counted)
    shared_text = BASE.format(output=tmp_path / "shared").replace(
        "params = { n_components = 2 }", "params = { n_components = 2, keep = 0.95 }"
    )
    shared_config = load_config(write_config(tmp_path / "a", shared_text + ID_99))
    assert cell_count(shared_config) == 4  # the attack, one fit, two detector cells
    shared = run_evaluation(shared_config)
    assert fitted == ["I-defender"] and list(shared.results["detector_fits"]) == ["I-defender"]
    alone_text = BASE.format(output=tmp_path / "alone").split("[[detectors]]")[0] + ID_99
    alone = run_evaluation(load_config(write_config(tmp_path / "b", alone_text)))
    assert fitted == ["I-defender", "I-defender (ID-99)"]
    id_99 = shared.results["detectors"]["I-defender (ID-99)"]
    assert id_99 == alone.results["detectors"]["I-defender (ID-99)"]
    assert id_99["clean_fpr"] < shared.results["detectors"]["I-defender"]["clean_fpr"]


def test_a_failed_blind_pgd_fails_its_budget_s_adaptive_cells_naming_it(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    adaptive = "{ eps = [0.1], max_iter = 2, search_steps = 1, samples = 4, unbounded = false }"
    path = write_config(tmp_path, BASE.format(output=tmp_path / "out") + STUDY.replace("{}", adaptive))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(detector_study, "blind_pgd", broken)
    result = run_evaluation(load_config(path))
    assert result.results["complete"] is False
    assert result.results["detectors"]["I-defender"]["status"] == "done"  # the rest of the study finished
    assert result.failed_cells == [
        {"kind": "adaptive_blind", "label": "Linf 0.1", "error": "RuntimeError: out of memory"},
        {
            "kind": "adaptive",
            "label": "I-defender | Linf 0.1",
            "error": "RuntimeError: adaptive_blind 'Linf 0.1' failed, so this cell cannot run: "
            "RuntimeError: out of memory",
        },
    ]
