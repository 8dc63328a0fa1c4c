"""Tests of xaiadv.evaluation.curves: iterate records of every library's attacks, and the per-point curves."""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from xaiadv.bridge.registry import build_attack
from xaiadv.evaluation.curves import (
    NORMS,
    AttackCurve,
    IterateRecord,
    IterateRecorder,
    concat_records,
    record_from_trace,
    summarize,
)
from xaiadv.evaluation.metrics import perturbation_norms

STEPS = 5
EPS, STEP = 0.1, 0.02
Batch = tuple[torch.Tensor, torch.Tensor]
Factory = Callable[..., nn.Module]


@pytest.fixture
def batch(digits_correct: Batch) -> Batch:
    return digits_correct[0][:32], digits_correct[1][:32]


def run_recorded(
    recorder: IterateRecorder, attack: Callable, x: torch.Tensor, y: torch.Tensor, *, end: bool
) -> tuple[torch.Tensor, IterateRecord]:
    """The attack inside a recording, ended at its result when ``end``; returns (x_adv, record)."""
    with recorder.recording(x, y):
        x_adv = attack(x, y)
        if end:
            recorder.end_at(x_adv)
    return x_adv, recorder.record


def assert_point_is(
    record: IterateRecord, point: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_t: torch.Tensor
) -> None:
    """Point ``point`` of the record holds x_t's success and norms, computed here independently."""
    with torch.no_grad():
        success = (model(x_t).argmax(1) != y).numpy()
    np.testing.assert_array_equal(record.success[point], success)
    expected = perturbation_norms(x.numpy(), x_t.numpy())
    for key in NORMS:
        np.testing.assert_allclose(record.norms[key][point], expected[key], rtol=1e-12, atol=0)


def hand_record(success: list[list[bool]], scale: float = 1.0) -> IterateRecord:
    """A record whose norm k of sample n at point t is (t + 1) * 10**n * (key index + 1) * scale."""
    success_array = np.array(success, dtype=bool)
    n_points, n_samples = success_array.shape
    base = np.outer(np.arange(1, n_points + 1), 10.0 ** np.arange(n_samples)) * scale
    return IterateRecord(success_array, {key: base * (i + 1) for i, key in enumerate(NORMS)})


# --------------------------------------------------------------------------------------------------
# the libraries' attacks through the recorder


def test_torchattacks_pgd_records_steps_points_and_end_at_adds_the_result(
    digits_cnn: nn.Module, batch: Batch
) -> None:
    """torchattacks PGD forwards iterates 0..steps-1 only (attacks/pgd.py: one get_logits per step, none
    after), so the record has ``steps`` points; end_at adds the returned x_adv as point ``steps``."""
    x, y = batch
    recorder = IterateRecorder(digits_cnn)
    attack = build_attack(
        "torchattacks:PGD", model=recorder, eps=EPS, alpha=STEP, steps=STEPS, random_start=False
    )
    _, bare = run_recorded(recorder, attack, x, y, end=False)
    x_adv, ended = run_recorded(recorder, attack, x, y, end=True)

    assert bare.success.shape == (STEPS, len(x))
    assert ended.success.shape == (STEPS + 1, len(x))
    np.testing.assert_array_equal(ended.success[:STEPS], bare.success)
    assert_point_is(ended, STEPS, digits_cnn, x, y, x_adv)
    assert_point_is(ended, 0, digits_cnn, x, y, x)
    assert ended.success[0].sum() == 0 and ended.success[-1].sum() > 0
    assert np.all(np.diff(ended.norms["Linf"], axis=0) >= 0)
    assert np.all(ended.norms["Linf"] <= np.minimum(np.arange(STEPS + 1) * STEP, EPS)[:, None] + 1e-6)


def test_foolbox_pgd_records_steps_plus_final_check(digits_cnn: nn.Module, batch: Batch) -> None:
    """Foolbox's LinfPGD forwards iterates 0..steps-1 for gradients, then checks the clipped result once:
    steps + 1 points, the last one the returned adversarials, so end_at changes nothing."""
    x, y = batch
    recorder = IterateRecorder(digits_cnn)
    attack = build_attack(
        "foolbox:LinfPGD",
        model=recorder,
        steps=STEPS,
        rel_stepsize=0.5,
        abs_stepsize=STEP,
        random_start=False,
        epsilons=EPS,
    )
    _, bare = run_recorded(recorder, attack, x, y, end=False)
    x_adv, ended = run_recorded(recorder, attack, x, y, end=True)

    assert bare.success.shape == ended.success.shape == (STEPS + 1, len(x))
    assert_point_is(bare, STEPS, digits_cnn, x, y, x_adv)
    assert_point_is(bare, 0, digits_cnn, x, y, x)
    for key in NORMS:
        np.testing.assert_array_equal(ended.norms[key], bare.norms[key])
    assert bare.success[-1].sum() > 0
    np.testing.assert_allclose(bare.norms["Linf"][1], STEP, rtol=1e-5)  # abs_stepsize wins over rel_stepsize


def test_art_bim_records_iterates_then_its_success_check(digits_cnn: nn.Module, batch: Batch) -> None:
    """ART's PyTorch PGD/BIM: max_iter loss gradients (iterates 0..max_iter-1), then compute_success predicts
    x_adv and the clean batch again: max_iter + 2 points. end_at drops the clean re-prediction."""
    x, y = batch
    recorder = IterateRecorder(digits_cnn)
    params = {"eps": EPS, "eps_step": STEP, "max_iter": STEPS, "batch_size": len(x), "verbose": False}
    attack = build_attack("art:BasicIterativeMethod", model=recorder, **params)
    _, bare = run_recorded(recorder, attack, x, y, end=False)
    x_adv, ended = run_recorded(recorder, attack, x, y, end=True)

    assert bare.success.shape == (STEPS + 2, len(x))
    assert_point_is(bare, STEPS + 1, digits_cnn, x, y, x)  # the clean batch, after the result
    assert ended.success.shape == (STEPS + 1, len(x))
    assert_point_is(ended, STEPS, digits_cnn, x, y, x_adv)
    np.testing.assert_array_equal(ended.success, bare.success[: STEPS + 1])
    assert ended.success[-1].sum() > 0


def test_our_trace_matches_the_attack_result(digits_cnn: nn.Module, batch: Batch) -> None:
    x, y = batch
    attack = build_attack("xaiadv:LRPGrad", model=digits_cnn, eps=STEP, max_iter=8, trace=True)
    x_adv = attack(x, y)
    result = attack.last_result
    record = record_from_trace(result.trace)

    assert record.success.shape == (9, len(x)) and record.success.dtype == bool
    np.testing.assert_array_equal(record.success[-1], result.success.numpy())
    assert 0 < result.success.sum() < len(x)  # both values occur, so the comparison can fail
    expected = perturbation_norms(x.numpy(), x_adv.numpy())
    for key in NORMS:
        assert record.norms[key].dtype == np.float64
        np.testing.assert_allclose(record.norms[key][-1], expected[key], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(record.norms[key][0], 0.0)


def test_record_from_trace_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="trace must be an AttackTrace"):
        record_from_trace(None)


# --------------------------------------------------------------------------------------------------
# the recorder as a model


def test_recorder_is_the_model_for_values_and_gradients(digits_cnn: nn.Module, batch: Batch) -> None:
    x, y = batch
    recorder = IterateRecorder(digits_cnn)
    with recorder.recording(x, y):
        for forward in (digits_cnn, recorder):
            probe = x.clone().requires_grad_(True)
            digits_cnn.zero_grad()
            logits = forward(probe)
            nn.functional.cross_entropy(logits, y).backward()
            if forward is digits_cnn:
                reference = (logits.detach(), probe.grad, [p.grad.clone() for p in digits_cnn.parameters()])
    assert torch.equal(logits.detach(), reference[0])
    assert torch.equal(probe.grad, reference[1]) and probe.grad.abs().sum() > 0
    for parameter, expected in zip(digits_cnn.parameters(), reference[2], strict=True):
        assert torch.equal(parameter.grad, expected)
    digits_cnn.zero_grad(set_to_none=True)
    assert recorder.record.success.shape == (1, len(x))  # only the recorder's call was a point


def test_preprocessing_is_applied_inside_and_norms_stay_raw(
    tiny_model: Factory, rng: np.random.Generator
) -> None:
    model = tiny_model("cnn", channels=3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    recorder = IterateRecorder(model, preprocessing=(mean, std))
    x = torch.as_tensor(rng.uniform(0, 1, (4, 3, 8, 8)), dtype=torch.float32)
    shift = torch.zeros_like(x)
    shift[:, 1, 2, 3] = 0.25
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with recorder.recording(x, torch.zeros(4, dtype=torch.long)):
        assert torch.allclose(recorder(x), model(normalized), atol=1e-6)
        recorder(x + shift)
    np.testing.assert_allclose(recorder.record.norms["Linf"], [[0.0] * 4, [0.25] * 4], rtol=1e-6)
    np.testing.assert_array_equal(recorder.record.norms["L0"][1], 1.0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_mode_and_state_are_preserved(
    tiny_model: Factory, training: bool, rng: np.random.Generator
) -> None:
    """torchattacks saves ``model.training`` of the module it gets and restores it: the recorder's flag is
    the model's, so an eval model is not left in train mode (nor the reverse), and .eval() reaches the model.
    end_at's own forward runs in eval mode: BatchNorm statistics stay as they were."""
    model = tiny_model("cnn_bn").train(training)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    recorder = IterateRecorder(model)
    assert recorder.training is training
    x = torch.as_tensor(rng.uniform(0, 1, (6, 1, 8, 8)), dtype=torch.float32)
    y = torch.arange(6)
    with recorder.recording(x, y):
        x_adv = torchattacks.PGD(recorder, eps=EPS, alpha=STEP, steps=2, random_start=False)(x, y)
        recorder.end_at(x_adv)  # no call saw x_adv: added by end_at
    assert all(module.training is training for module in model.modules())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert recorder.record.success.shape == (3, 6)
    recorder.eval()
    assert not any(module.training for module in model.modules())


def test_no_recording_outside_the_context_nor_of_other_shapes(
    tiny_model: Factory, rng: np.random.Generator
) -> None:
    model = tiny_model("mlp")
    recorder = IterateRecorder(model)
    x = torch.as_tensor(rng.uniform(0, 1, (5, 1, 8, 8)), dtype=torch.float32)
    y = torch.zeros(5, dtype=torch.long)
    recorder(x)
    with pytest.raises(RuntimeError, match="no completed recording"):
        _ = recorder.record
    with recorder.recording(x, y):
        recorder(x[:1])  # a class-count probe
        recorder(x[:3])  # a mini-batch
        recorder(x)
        recorder(x.flatten(1))  # the same values, another shape
    recorder(x)
    assert recorder.record.success.shape == (1, 5)


def test_recording_keeps_no_tensor_alive(tiny_model: Factory, rng: np.random.Generator) -> None:
    """float64 CPU inputs are the case where a numpy view would share (and keep) the caller's tensor."""
    model = tiny_model("mlp", dtype=torch.float64)
    recorder = IterateRecorder(model)
    x = torch.as_tensor(rng.uniform(0, 1, (5, 1, 8, 8)))
    y = torch.arange(5)
    step = x + 0.1
    refs = [weakref.ref(tensor) for tensor in (x, y, step)]
    with recorder.recording(x, y):
        recorder(step)
    del x, y, step
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    np.testing.assert_allclose(recorder.record.norms["Linf"][0], 0.1)


def test_x_orig_is_copied(tiny_model: Factory, rng: np.random.Generator) -> None:
    """An attack that writes into the input it was given does not move the reference point of the norms."""
    recorder = IterateRecorder(tiny_model("mlp", dtype=torch.float64))
    x = torch.as_tensor(rng.uniform(0, 1, (5, 1, 8, 8)))
    with recorder.recording(x, torch.arange(5)):
        x.add_(0.1)
        recorder(x)
    np.testing.assert_allclose(recorder.record.norms["Linf"][0], 0.1)


def test_an_exception_leaves_no_record_and_the_recorder_reusable(
    tiny_model: Factory, rng: np.random.Generator
) -> None:
    recorder = IterateRecorder(tiny_model("mlp"))
    x = torch.as_tensor(rng.uniform(0, 1, (3, 1, 8, 8)), dtype=torch.float32)
    y = torch.arange(3)
    with recorder.recording(x, y):
        recorder(x)
    with pytest.raises(KeyError), recorder.recording(x, y):
        recorder(x)
        raise KeyError("attack failed")
    with pytest.raises(RuntimeError, match="no completed recording"):
        _ = recorder.record
    with recorder.recording(x, y):
        recorder(x)
        recorder(x)
    assert recorder.record.success.shape == (2, 3)


def test_recorder_rejects_bad_input(tiny_model: Factory, rng: np.random.Generator) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        IterateRecorder(lambda x: x)
    recorder = IterateRecorder(tiny_model("mlp"))
    x = torch.as_tensor(rng.uniform(0, 1, (4, 1, 8, 8)), dtype=torch.float32)
    y = torch.arange(4)
    with pytest.raises(ValueError, match=r"y must hold one class index per sample of x_orig: shape \(4,\)"):
        recorder.recording(x, y[:3]).__enter__()
    with pytest.raises(TypeError, match=r"y must be a torch\.Tensor of integer class indices"):
        recorder.recording(x, y.float()).__enter__()
    with pytest.raises(TypeError, match=r"x_orig must be a torch\.Tensor batch"):
        recorder.recording(x.numpy(), y).__enter__()
    with pytest.raises(RuntimeError, match="end_at must be called inside recording"):
        recorder.end_at(x)
    with recorder.recording(x, y):
        with pytest.raises(ValueError, match=r"x_adv must be a torch\.Tensor shaped like x_orig"):
            recorder.end_at(x[:2])
        with pytest.raises(RuntimeError, match="already recording"):
            recorder.recording(x, y).__enter__()
    with pytest.raises(ValueError, match="preprocessing std must be positive"):
        IterateRecorder(tiny_model("mlp"), preprocessing=(0.0, 0.0)).recording(x, y).__enter__()


# --------------------------------------------------------------------------------------------------
# summarize, AttackCurve, concat_records


def test_summarize_by_hand() -> None:
    """Samples 0-2 initially correct, sample 3 not: its success never counts, in ASR or in the means."""
    record = hand_record([[False, False, False, True], [True, False, False, True], [True, True, False, True]])
    curve = summarize(record, np.array([True, True, True, False]))
    np.testing.assert_array_equal(curve.iteration, [0, 1, 2])
    np.testing.assert_allclose(curve.asr, [0.0, 1 / 3, 2 / 3], rtol=1e-15)
    # point 1: sample 0 alone, 2 * 1; point 2: samples 0 and 1, (3 * 1 + 3 * 10) / 2; times the key index + 1
    for i, key in enumerate(NORMS):
        assert math.isnan(curve.norms[key][0])
        np.testing.assert_allclose(curve.norms[key][1:], np.array([2.0, 16.5]) * (i + 1), rtol=1e-15)


def test_summarize_without_initially_correct_samples_is_nan() -> None:
    curve = summarize(hand_record([[True, False]]), np.array([False, False]))
    assert math.isnan(curve.asr[0]) and all(math.isnan(curve.norms[key][0]) for key in NORMS)


def test_summarize_rejects_bad_input() -> None:
    record = hand_record([[True, False]])
    with pytest.raises(ValueError, match=r"initially_correct must have one entry per sample: shape \(2,\)"):
        summarize(record, np.array([True, False, True]))
    with pytest.raises(TypeError, match="initially_correct must be a bool array"):
        summarize(record, np.array([1, 0]))
    with pytest.raises(TypeError, match="record must be an IterateRecord"):
        summarize({"success": record.success}, np.array([True, False]))


def test_iterate_record_validates_itself() -> None:
    success = np.zeros((2, 3), dtype=bool)
    norms = {key: np.zeros((2, 3)) for key in NORMS}
    with pytest.raises(ValueError, match="success must be a bool numpy array"):
        IterateRecord(success.astype(int), norms)
    with pytest.raises(ValueError, match="norms must be a dict with exactly the keys"):
        IterateRecord(success, {key: norms[key] for key in NORMS[:3]})
    with pytest.raises(ValueError, match=r"norms\['L2'\] must be a float64 array shaped like success"):
        IterateRecord(success, {**norms, "L2": np.zeros((3, 2))})


def test_curve_dict_round_trip_is_json_with_none_for_nan() -> None:
    record = hand_record([[False, True], [True, True]])
    curve = summarize(record, np.array([True, True]))
    data = curve.to_dict()
    assert list(data) == ["iteration", "asr", *NORMS]
    assert data["iteration"] == [0, 1] and data["asr"] == [0.5, 1.0]
    assert data["L0"] == [10.0, 11.0]  # point 0: sample 1 alone; point 1: (2 + 20) / 2
    text = json.dumps(summarize(record, np.array([True, False])).to_dict(), allow_nan=False)
    back = AttackCurve.from_dict(json.loads(text))
    assert json.loads(text)["L2"][0] is None and math.isnan(back.norms["L2"][0])
    assert back.iteration.dtype == np.int64
    np.testing.assert_array_equal(back.asr, [0.0, 1.0])
    np.testing.assert_array_equal(AttackCurve.from_dict(data).norms["Linf"], curve.norms["Linf"])
    with pytest.raises(ValueError, match="data must be a dict with exactly the keys"):
        AttackCurve.from_dict({key: value for key, value in data.items() if key != "asr"})


def test_concat_records_pads_shorter_batches_with_their_last_point() -> None:
    short = hand_record([[False, False], [True, False]])
    long = hand_record([[False], [False], [False], [True]], scale=7.0)
    joined = concat_records([short, long])
    assert joined.success.shape == (4, 3)
    np.testing.assert_array_equal(
        joined.success[:, :2], [[False, False], [True, False], [True, False], [True, False]]
    )
    np.testing.assert_array_equal(joined.success[:, 2], long.success[:, 0])
    for key in NORMS:
        np.testing.assert_array_equal(joined.norms[key][2:, :2], np.repeat(short.norms[key][-1:], 2, axis=0))
        np.testing.assert_array_equal(joined.norms[key][:2, :2], short.norms[key])
        np.testing.assert_array_equal(joined.norms[key][:, 2], long.norms[key][:, 0])


def test_concat_records_rejects_a_batch_without_points_and_empty_input() -> None:
    empty = IterateRecord(np.zeros((0, 2), dtype=bool), {key: np.zeros((0, 2)) for key in NORMS})
    with pytest.raises(ValueError, match=r"records\[1\] has no points to pad to 2"):
        concat_records([hand_record([[True], [True]]), empty])
    with pytest.raises(ValueError, match="records must be a non-empty sequence of IterateRecord"):
        concat_records([])
    no_samples = IterateRecord(np.zeros((0, 0), dtype=bool), {key: np.zeros((0, 0)) for key in NORMS})
    assert concat_records([hand_record([[True], [False]]), no_samples]).success.shape == (2, 1)
