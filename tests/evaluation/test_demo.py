"""Tests of xaiadv.evaluation.demo on scikit-learn digits: rows, the model cache, the data fallback."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.evaluation import data, demo, models
from xaiadv.evaluation.demo import DEMO_ATTACKS, AttackRow, demo_dataset, run_attack_row, run_demo
from xaiadv.evaluation.models import TrainConfig, TrainedModel, load_model

N_SAMPLES = 20
TRAIN = TrainConfig(dataset="digits", epochs=3)
LRP_GRAD_EPS, LRP_GRAD_ITER = 0.02, 10
_BIM = next(row for row in DEMO_ATTACKS if row[1] == "art:BasicIterativeMethod")
#: LRP-grad with a step large enough to succeed on some samples within 10 iterations (8 of 17 at the time
#: of writing), and the demo's own ART BIM row cut to 10 iterations of one 8-bit level.
FAST_ATTACKS = (
    ("LRP-grad", "xaiadv:LRPGrad", {"eps": LRP_GRAD_EPS, "max_iter": LRP_GRAD_ITER}),
    (_BIM[0], _BIM[1], {**_BIM[2], "max_iter": 10}),
)
MEDIANS = ("median_l0", "median_l1", "median_l2", "median_linf")


pytestmark = pytest.mark.usefixtures("isolated")  # tests/evaluation/conftest.py


def _check_row(row: AttackRow) -> None:
    """The invariants of one table row."""
    assert 0.0 <= row.asr <= 1.0
    assert 0 <= row.n_success <= row.n_correct <= N_SAMPLES
    assert row.asr == pytest.approx(row.n_success / row.n_correct, abs=1e-12)
    assert row.seconds_per_image > 0.0
    medians = [getattr(row, name) for name in MEDIANS]
    if row.n_success == 0:
        assert all(math.isnan(value) for value in medians), row
    else:
        assert not any(math.isnan(value) for value in medians), row
        assert row.median_l0 >= 1.0
        # per sample Linf <= L2 <= L1, and the median is monotone under a per-sample ordering
        assert 0.0 < row.median_linf <= row.median_l2 <= row.median_l1


def _comparable(row: AttackRow) -> tuple[object, ...]:
    """Everything of a row but its timing, with NaN made comparable."""
    values = (row.label, row.name, row.asr, row.n_correct, row.n_success, *(getattr(row, m) for m in MEDIANS))
    return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in values)


def test_run_demo_rows_then_cached_model(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    trainings: list[TrainConfig] = []
    real_train = models.train_reference_model

    def counting_train(dataset: data.Dataset, config: TrainConfig, **kwargs: object) -> TrainedModel:
        trainings.append(config)
        return real_train(dataset, config, **kwargs)

    monkeypatch.setattr(models, "train_reference_model", counting_train)

    first = run_demo(N_SAMPLES, dataset="digits", train=TRAIN, attacks=FAST_ATTACKS)
    assert trainings == [TRAIN]
    assert (first.dataset, first.fell_back, first.n_samples) == ("digits", False, N_SAMPLES)
    assert [(row.label, row.name) for row in first.rows] == [(label, name) for label, name, _ in FAST_ATTACKS]
    assert first.seconds > 0.0
    for row in first.rows:
        _check_row(row)

    # the cache entry written by the first call, and the row counts recomputed from it independently
    [manifest] = (isolated / "models").glob("digits-*.json")
    [weights] = (isolated / "models").glob("digits-*.safetensors")
    stamps = (manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    cached = load_model(manifest.with_suffix(""))
    assert cached.config == TRAIN
    assert first.test_accuracy == cached.test_accuracy > 0.9
    digits = data.load_dataset("digits")
    with torch.no_grad():
        clean = cached.model(torch.as_tensor(digits.x_test[:N_SAMPLES])).argmax(1).numpy()
    n_correct = int((clean == digits.y_test[:N_SAMPLES]).sum())
    assert 0 < n_correct < N_SAMPLES  # both kinds of sample are present, so the exclusion matters
    assert all(row.n_correct == n_correct for row in first.rows)

    lrp_grad = first.rows[0]
    assert lrp_grad.n_success > 0  # the medians' non-NaN branch is exercised
    assert lrp_grad.median_linf <= LRP_GRAD_EPS * LRP_GRAD_ITER + 1e-6  # within the step budget

    # second call: the model comes from the cache, the files are not rewritten, the rows are the same
    second = run_demo(N_SAMPLES, dataset="digits", train=TRAIN, attacks=FAST_ATTACKS)
    assert trainings == [TRAIN]
    assert (manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps
    assert second.test_accuracy == first.test_accuracy
    assert [_comparable(row) for row in second.rows] == [_comparable(row) for row in first.rows]


def test_every_demo_attack_runs_with_its_own_parameters() -> None:
    """All of DEMO_ATTACKS, each with its own parameters (only max_iter cut to 2), through the registry."""
    short = tuple((label, name, {**params, "max_iter": 2}) for label, name, params in DEMO_ATTACKS)
    tiny = TrainConfig(dataset="digits", epochs=1, width=4, max_train=64)
    result = run_demo(N_SAMPLES, dataset="digits", train=tiny, attacks=short)
    assert [(row.label, row.name) for row in result.rows] == [
        (label, name) for label, name, _ in DEMO_ATTACKS
    ]
    for row in result.rows:
        if row.n_correct:
            _check_row(row)
        else:  # the tiny model may get none of the sample right: then there is nothing to attack
            assert math.isnan(row.asr) and row.n_success == 0


def test_run_attack_row_without_success_has_nan_medians(isolated: Path) -> None:
    """A model whose output ignores its input cannot be fooled: n_success 0, ASR 0, every median NaN."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(10.0))  # always class 9
    model.eval()
    trained = TrainedModel(model=model, config=TRAIN, test_accuracy=0.1, path=None)
    x = torch.as_tensor(data.load_dataset("digits").x_test[:6])
    y = torch.tensor([9, 9, 9, 9, 0, 1])
    clean = np.full(6, 9)
    row = run_attack_row(*FAST_ATTACKS[1], trained, x, y, clean, batch_size=4)  # two mini-batches
    assert (row.asr, row.n_correct, row.n_success) == (0.0, 4, 0)
    assert all(math.isnan(getattr(row, name)) for name in MEDIANS)
    assert row.seconds_per_image > 0.0


def test_run_attack_row_counts_only_initially_correct_successes(isolated: Path) -> None:
    """Labels chosen so that some samples are wrong before the attack: they never count as successes."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(10.0))
    model.eval()
    trained = TrainedModel(model=model, config=TRAIN, test_accuracy=0.1, path=None)
    x = torch.zeros(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])  # all misclassified (the model says 9)
    row = run_attack_row(*FAST_ATTACKS[1], trained, x, y, np.full(3, 9))
    assert (row.n_correct, row.n_success) == (0, 0)
    assert math.isnan(row.asr)


def test_demo_dataset_falls_back_to_digits(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xaiadv.evaluation.demo"):
        dataset, fell_back = demo_dataset("fashion_mnist")
    assert fell_back is True
    assert dataset.name == "digits" and dataset.input_shape == (1, 8, 8)
    warnings = [r for r in caplog.records if r.name == demo.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "fashion_mnist" in warnings[0].getMessage()
    assert "falling back to scikit-learn's digits" in warnings[0].getMessage()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_demo_dataset_uses_the_preferred_set_when_present(
    isolated: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = isolated.parent / "data" / "fashion_mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    with caplog.at_level(logging.WARNING, logger="xaiadv.evaluation.demo"):
        dataset, fell_back = demo_dataset("fashion_mnist")
    assert fell_back is False
    assert (dataset.name, len(dataset.x_train), len(dataset.x_test)) == ("fashion_mnist", 6, 4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_demo_dataset_digits_never_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        dataset, fell_back = demo_dataset("digits")
    assert (dataset.name, fell_back) == ("digits", False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_run_demo_falls_back_and_trains_on_digits(isolated: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Asked for Fashion-MNIST that is not there, with a Fashion-MNIST config: digits, with a digits model."""
    tiny = TrainConfig(dataset="fashion_mnist", epochs=1, width=4, max_train=64)
    with caplog.at_level(logging.WARNING, logger="xaiadv.evaluation.demo"):
        result = run_demo(5, train=tiny, attacks=FAST_ATTACKS[:1])
    assert (result.dataset, result.fell_back, result.n_samples, len(result.rows)) == ("digits", True, 5, 1)
    assert any("falling back" in r.getMessage() for r in caplog.records)
    [manifest] = (isolated / "models").glob("*.json")
    assert manifest.name.startswith("digits-")
    expected = TrainConfig(**{**tiny.to_dict(), "dataset": "digits"})
    assert load_model(manifest.with_suffix("")).config == expected


@pytest.mark.parametrize("n_samples", [0, -3, True, 2.0, "20"])
def test_run_demo_rejects_bad_n_samples_before_any_work(
    monkeypatch: pytest.MonkeyPatch, n_samples: object
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("run_demo did work before validating n_samples")

    monkeypatch.setattr(demo, "demo_dataset", no_work)
    monkeypatch.setattr(demo, "load_or_train", no_work)
    with pytest.raises(ValueError, match=r"n_samples must be an int > 0; got "):
        run_demo(n_samples, dataset="digits", attacks=FAST_ATTACKS)  # type: ignore[arg-type]


def test_demo_attacks_are_the_thesis_settings() -> None:
    """Every demo attack is a registry name with the thesis's 100-iteration budget."""
    from xaiadv.bridge.registry import available_attacks

    names = set(available_attacks())
    assert len({label for label, _, _ in DEMO_ATTACKS}) == len(DEMO_ATTACKS)
    for _, name, params in DEMO_ATTACKS:
        assert name in names
        assert params["max_iter"] == demo.MAX_ITER == 100
