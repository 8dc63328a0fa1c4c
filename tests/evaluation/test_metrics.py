"""Tests of xaiadv.evaluation.metrics: attack success rate (thesis eq. 4.15) and perturbation norms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xaiadv.evaluation.metrics import attack_success_rate, perturbation_norms

# --------------------------------------------------------------------------------------------------
# attack_success_rate


def test_asr_excludes_initially_misclassified_samples() -> None:
    """Five samples, three initially correct, one of those flipped: ASR = 1/3.

    Sample 3 is wrong before and after, sample 4 wrong before and right after: neither counts, so the
    naive "wrong after the attack" rate (2/5) and the "changed prediction" rate (3/5) are both wrong.
    """
    y = np.array([0, 1, 2, 3, 4])
    clean = np.array([0, 1, 2, 0, 0])
    adversarial = np.array([9, 1, 2, 0, 4])
    assert attack_success_rate(y, clean, adversarial) == pytest.approx(1 / 3, abs=1e-15)


def test_asr_sample_wrong_before_and_right_after_is_no_success() -> None:
    y = np.array([5, 6])
    clean = np.array([5, 0])  # sample 1 misclassified before the attack
    adversarial = np.array([5, 6])  # ... and "repaired" by it
    assert attack_success_rate(y, clean, adversarial) == 0.0


def test_asr_sample_wrong_before_and_after_is_no_success() -> None:
    y = np.array([5, 6])
    clean = np.array([5, 0])
    adversarial = np.array([5, 1])
    assert attack_success_rate(y, clean, adversarial) == 0.0


@pytest.mark.parametrize(
    ("adversarial", "expected"),
    [([0, 1, 2, 3], 0.0), ([1, 1, 0, 3], 0.5), ([1, 2, 3, 0], 1.0), ([0, 7, 2, 3], 0.25)],
    ids=["none-flipped", "half-flipped", "all-flipped", "one-flipped"],
)
def test_asr_all_correct_before(adversarial: list[int], expected: float) -> None:
    y = np.array([0, 1, 2, 3])
    result = attack_success_rate(y, y.copy(), np.array(adversarial))
    assert isinstance(result, float)
    assert result == expected


@pytest.mark.parametrize("adversarial", [[1, 2, 3], [0, 0, 0]], ids=["adv-equals-y", "adv-wrong"])
def test_asr_none_correct_before_is_nan(adversarial: list[int]) -> None:
    y = np.array([1, 2, 3])
    result = attack_success_rate(y, np.array([0, 0, 0]), np.array(adversarial))
    assert isinstance(result, float)
    assert math.isnan(result)


def test_asr_empty_is_nan() -> None:
    empty = np.array([], dtype=np.int64)
    assert math.isnan(attack_success_rate(empty, empty, empty))


@pytest.mark.parametrize("position", [0, 1, 2], ids=["y", "clean_prediction", "adversarial_prediction"])
def test_asr_length_mismatch_raises(position: int) -> None:
    arrays = [np.array([0, 1, 2, 3]) for _ in range(3)]
    arrays[position] = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="must have one entry per sample"):
        attack_success_rate(*arrays)


def test_asr_rejects_logits_in_place_of_labels() -> None:
    """(N, C) scores instead of (N,) class indices are a shape mismatch, not silently flattened into N*C."""
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="must have one entry per sample"):
        attack_success_rate(y, y, np.eye(3))


def test_asr_does_not_modify_inputs() -> None:
    y, clean, adversarial = np.array([0, 1, 2]), np.array([0, 1, 0]), np.array([1, 1, 0])
    copies = [a.copy() for a in (y, clean, adversarial)]
    attack_success_rate(y, clean, adversarial)
    for array, copy in zip((y, clean, adversarial), copies, strict=True):
        np.testing.assert_array_equal(array, copy)


labels = st.lists(st.tuples(*(st.integers(0, 3),) * 3), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(labels)
def test_asr_matches_a_per_sample_reference(samples: list[tuple[int, int, int]]) -> None:
    """Oracle: count in a plain Python loop over samples, following eq. 4.15 literally."""
    y, clean, adversarial = (np.array(column) for column in zip(*samples, strict=True))
    correct_before = sum(1 for t, c, _ in samples if c == t)
    correct_after = sum(1 for t, c, a in samples if c == t and a == t)
    result = attack_success_rate(y, clean, adversarial)
    if correct_before == 0:
        assert math.isnan(result)
    else:
        assert result == pytest.approx((correct_before - correct_after) / correct_before, abs=1e-15)
        assert 0.0 <= result <= 1.0


# --------------------------------------------------------------------------------------------------
# perturbation_norms

ORDERS = {"L0": 0, "L1": 1, "L2": 2, "Linf": np.inf}


@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (5, 10), (4, 1, 8, 8)], ids=["NCHW", "NF", "digits"])
def test_norms_equal_numpy_linalg_norm_per_sample(rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    x = rng.uniform(0.0, 1.0, shape)
    noise = rng.normal(0.0, 0.1, shape)
    noise[rng.uniform(size=shape) < 0.4] = 0.0  # exact zeros, so L0 is not just the size
    noise[0] = 0.0  # one sample untouched
    x_adv = x + noise
    norms = perturbation_norms(x, x_adv)
    assert set(norms) == set(ORDERS)
    delta = x_adv - x
    for key, order in ORDERS.items():
        expected = np.array([np.linalg.norm(d.ravel(), ord=order) for d in delta])
        assert norms[key].shape == (shape[0],)
        assert norms[key].dtype == np.float64
        np.testing.assert_allclose(norms[key], expected, rtol=1e-12, atol=0.0, err_msg=key)
    np.testing.assert_array_equal(norms["L0"], [np.count_nonzero(d) for d in delta])
    assert norms["L0"][0] == 0.0 and 0.0 < norms["L0"][1:].min() < delta[0].size


def test_norms_zero_perturbation_gives_zeros(rng: np.random.Generator) -> None:
    x = rng.uniform(size=(3, 1, 8, 8))
    norms = perturbation_norms(x, x.copy())
    for key in ORDERS:
        np.testing.assert_array_equal(norms[key], np.zeros(3), err_msg=key)


def test_norms_of_float32_inputs_are_float64_and_exact_on_a_known_delta() -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    x_adv = np.array([[0.5, -0.25, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]], dtype=np.float32)
    norms = perturbation_norms(x, x_adv)
    np.testing.assert_array_equal(norms["L0"], [2.0, 1.0])
    np.testing.assert_array_equal(norms["L1"], [0.75, 1.0])
    np.testing.assert_allclose(norms["L2"], [math.sqrt(0.3125), 1.0], rtol=1e-15)
    np.testing.assert_array_equal(norms["Linf"], [0.5, 1.0])
    assert all(value.dtype == np.float64 for value in norms.values())


def test_norms_do_not_modify_inputs(rng: np.random.Generator) -> None:
    x, x_adv = rng.uniform(size=(2, 5)), rng.uniform(size=(2, 5))
    x_copy, x_adv_copy = x.copy(), x_adv.copy()
    perturbation_norms(x, x_adv)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(x_adv, x_adv_copy)


@pytest.mark.parametrize(
    ("x_shape", "adv_shape"),
    [((2, 5), (2, 6)), ((2, 5), (3, 5)), ((2, 1, 4, 4), (2, 16))],
    ids=["features", "batch", "flattened"],
)
def test_norms_shape_mismatch_raises(x_shape: tuple[int, ...], adv_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"x and x_adv must have the same shape; got \(.*\) and \(.*\)"):
        perturbation_norms(np.zeros(x_shape), np.zeros(adv_shape))
