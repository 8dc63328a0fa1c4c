"""Unit tests of the attack study's tables and checks on hand-made cells."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.evaluation import attack_study
from xaiadv.evaluation.attack_study import Sample, attack_warnings, equal_asr_table
from xaiadv.evaluation.config import AttackSpec
from xaiadv.plugins.checks import looks_like_probabilities


def _cell(name: str, asr: float, n_success: int, n_correct: int = 4, status: str = "done") -> dict[str, Any]:
    return {"name": name, "asr": asr, "n_success": n_success, "n_correct": n_correct, "status": status}


def _arrays(l1: list[float], successful: list[bool]) -> dict[str, np.ndarray]:
    values = np.asarray(l1, dtype=np.float64)
    return {
        "successful": np.asarray(successful),
        "norm_L1": values,
        "norm_L2": values / 2,
        "norm_Linf": values / 4,
    }


CELLS = {
    "A": _cell("xaiadv:LRPGrad", 1.0, 4),
    "B": _cell("art:BasicIterativeMethod", 0.5, 2),
    "C": _cell("art:PixelAttack", 0.25, 1),
    "D": _cell("foolbox:LinfPGD", 0.0, 0),
}
ARRAYS = {
    "A": _arrays([4.0, 1.0, 3.0, 2.0], [True, True, True, True]),
    "B": _arrays([9.0, 5.0, 7.0, 0.0], [True, False, True, False]),
    "C": _arrays([0.5, 0.0, 0.0, 0.0], [True, False, False, False]),
    "D": _arrays([0.0, 0.0, 0.0, 0.0], [False, False, False, False]),
}


def test_equal_asr_takes_each_attacks_cheapest_successes_at_the_lowest_asr() -> None:
    table = equal_asr_table(CELLS, ARRAYS)
    assert table["asr"] == 0.25  # C's; D never succeeded and is excluded
    assert table["excluded"] == ["D"]
    # 0.25 of 4 correct = 1 success: the smallest L1 of each attack's successes
    assert table["rows"]["A"] == {"n": 1, "L1": 1.0, "L2": 0.5, "Linf": 0.25}
    assert table["rows"]["B"]["L1"] == 7.0 and table["rows"]["C"]["L1"] == 0.5


def test_equal_asr_over_a_chosen_subset() -> None:
    table = equal_asr_table(CELLS, ARRAYS, ("A", "B"))
    assert table["asr"] == 0.5 and table["excluded"] == ["C", "D"]
    assert table["rows"]["A"]["n"] == table["rows"]["B"]["n"] == 2
    assert table["rows"]["A"]["L1"] == pytest.approx(1.5)  # mean of 1 and 2
    assert table["rows"]["B"]["L1"] == pytest.approx(8.0)  # mean of 7 and 9


def test_equal_asr_with_nothing_to_compare() -> None:
    table = equal_asr_table({"D": CELLS["D"], "E": {**_cell("x", 0, 0), "status": "failed"}}, ARRAYS)
    assert table["asr"] is None and table["rows"] == {} and table["excluded"] == ["D", "E"]


def test_warns_when_a_single_step_or_black_box_attack_beats_every_iterative_one() -> None:
    cells = {
        "FGSM": _cell("art:FastGradientMethod", 0.9, 3),
        "BIM": _cell("art:BasicIterativeMethod", 0.6, 2),
    }
    (warning,) = attack_warnings(cells)
    assert warning.startswith("FGSM (single-step or black-box) reaches ASR 0.900, above every white-box")
    cells["PGD"] = _cell("foolbox:LinfPGD", 0.95, 4)
    assert attack_warnings(cells) == []


def test_probability_outputs_are_recognized() -> None:
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    assert not looks_like_probabilities(torch.from_numpy(logits))
    assert looks_like_probabilities(torch.from_numpy(attack_study.softmax(logits)))


def test_zero_gradient_share_counts_samples_with_an_all_zero_gradient() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
        model[1].bias.zero_()
        model[3].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[3].bias.copy_(torch.tensor([0.5, 0.0]))
    # negative inputs die at the ReLU: logits (0.5, 0) whatever x is, so class 0 and a zero gradient
    x = torch.tensor([[-1.0, -1.0], [-2.0, -0.5], [3.0, 0.0], [0.0, 3.0]]).view(4, 1, 1, 2)
    y = torch.tensor([0, 0, 0, 1])
    logits = attack_study.predict(model, x, 2, torch.device("cpu"))
    sample = Sample(x, y, logits.argmax(1), attack_study.softmax(logits))
    assert sample.initially_correct.tolist() == [True, True, True, True]
    assert attack_study.zero_gradient_share(model, sample, 3, torch.device("cpu")) == 0.5


def test_a_cell_says_why_its_figures_are_null(digits_cnn: nn.Module) -> None:
    """An attack too weak to succeed: norms and confidences are null, with the reason."""
    x = torch.zeros(3, 1, 8, 8)
    logits = attack_study.predict(digits_cnn, x, 8, torch.device("cpu"))
    sample = Sample(x, torch.as_tensor(logits.argmax(1)), logits.argmax(1), attack_study.softmax(logits))
    spec = AttackSpec("xaiadv:LRPGrad", "one tiny step", {"eps": 1e-6, "max_iter": 1})
    cell, _ = attack_study.run_attack_cell(spec, digits_cnn, sample, batch_size=8, device=torch.device("cpu"))
    assert cell["asr"] == 0.0 and cell["norms"]["L1"]["median"] is None
    assert cell["undefined"] == {"norms": "no sample succeeded", "confidence": "no sample succeeded"}
    wrong = Sample(x, (sample.y + 1) % 10, sample.prediction, sample.probabilities)
    cell, _ = attack_study.run_attack_cell(spec, digits_cnn, wrong, batch_size=8, device=torch.device("cpu"))
    assert cell["undefined"]["asr"] == "no sample was classified correctly before the attack"
