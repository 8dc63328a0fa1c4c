"""Feature capture by layer name, and threshold calibration (strict '>' flags, per class, equal error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.plugins.calibration import (
    check_fpr,
    equal_error_threshold,
    per_class_thresholds,
    threshold_at_fpr,
)
from xaiadv.plugins.features import FeatureExtractor, last_layer_of_type, layer_names, pooled


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_captures_outputs_and_inputs_equal_to_a_manual_forward() -> None:
    model = _net().eval()
    x = torch.rand(5, 1, 6, 6)
    outputs = FeatureExtractor(model, ["1", "5"])(x, batch_size=2)
    inputs = FeatureExtractor(model, ["5"], capture="input")(x)
    expected_relu = torch.relu(model[0](x))
    expected_hidden = model[4](model[3](model[2](expected_relu)))
    torch.testing.assert_close(outputs["1"], expected_relu)
    torch.testing.assert_close(outputs["5"], model(x))
    torch.testing.assert_close(inputs["5"], expected_hidden)
    assert _hooks(model) == 0


def test_hooks_removed_and_modes_restored_after_an_exception() -> None:
    model = _net().train()
    model[3].eval()
    extractor = FeatureExtractor(model, ["3"])
    with pytest.raises(RuntimeError, match="boom"), extractor.capturing():
        assert not model.training
        raise RuntimeError("boom")
    assert _hooks(model) == 0
    assert model.training and not model[3].training


def test_undetached_capture_keeps_the_graph() -> None:
    model = _net()
    x = torch.rand(2, 1, 6, 6, requires_grad=True)
    with FeatureExtractor(model, ["3"]).capturing(detach=False) as captured:
        model(x)
    (grad,) = torch.autograd.grad(captured["3"].sum(), x)
    assert grad.abs().sum() > 0


def test_unknown_layer_lists_the_layers() -> None:
    with pytest.raises(ValueError, match=r"not in the model; its layers are: 0, 1, 2, 3, 4, 5"):
        FeatureExtractor(_net(), ["fc9"])


@pytest.mark.parametrize("layers", ["3", []], ids=["bare-string", "empty"])
def test_layers_must_be_a_non_empty_sequence(layers: object) -> None:
    with pytest.raises(ValueError, match="non-empty sequence of layer names"):
        FeatureExtractor(_net(), layers)  # type: ignore[arg-type]


def test_helpers() -> None:
    model = _net()
    assert layer_names(model) == ["0", "1", "2", "3", "4", "5"]
    assert last_layer_of_type(model, nn.Linear) == "5"
    assert last_layer_of_type(model, nn.Conv2d) == "0"
    with pytest.raises(ValueError, match="no layer of type"):
        last_layer_of_type(model, nn.BatchNorm2d)
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    torch.testing.assert_close(pooled(maps), maps.mean(dim=(2, 3)))
    assert pooled(torch.zeros(4, 7)).shape == (4, 7)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.3])
def test_threshold_flags_at_most_fpr_of_the_clean_scores(fpr: float) -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    threshold = threshold_at_fpr(scores, fpr)
    flagged = float(np.mean(scores > threshold))
    assert flagged <= fpr
    assert flagged >= fpr - 1 / scores.size  # the smallest such threshold: one sample from the target


def test_threshold_on_a_hand_made_case() -> None:
    # ten scores 0..9: flagging at most 20% means only 8 and 9 above, so the threshold is 7
    assert threshold_at_fpr(np.arange(10.0), 0.2) == 7.0


def test_per_class_thresholds_and_missing_class() -> None:
    scores = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(per_class_thresholds(scores, classes, 2, 0.25), [2.0, 12.0])
    with pytest.raises(ValueError, match="class 2 has no clean calibration samples"):
        per_class_thresholds(scores, classes, 3, 0.25)


def test_equal_error_threshold_with_ties() -> None:
    clean = np.array([0.0, 1.0, 2.0, 3.0])
    adversarial = np.array([2.0, 3.0, 4.0, 5.0])
    threshold, eer = equal_error_threshold(clean, adversarial)
    # at t=2: clean above = {3} -> FPR 1/4; adversarial at or below = {2} -> FNR 1/4
    assert threshold == 2.0
    assert eer == 0.25
    separable_threshold, separable_eer = equal_error_threshold(np.zeros(3), np.ones(3))
    assert separable_eer == 0.0 and separable_threshold == 0.0


@pytest.mark.parametrize("fpr", [0, 1, -0.1, 1.5, float("nan"), True, "0.05"])
def test_fpr_outside_the_open_interval_is_refused(fpr: object) -> None:
    with pytest.raises(ValueError, match=r"fpr must be a number in \(0, 1\)"):
        check_fpr(fpr)


@pytest.mark.parametrize(("scores", "message"), [(np.array([]), "empty"), (np.array([1.0, np.nan]), "NaN")])
def test_bad_scores_are_refused(scores: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        threshold_at_fpr(scores, 0.05)
