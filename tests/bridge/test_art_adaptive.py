"""DetectorAwarePGD as an ART EvasionAttack: ART's classifier in, numpy out, the detector's own threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from xaiadv.bridge.art import DetectorAwarePGD


class TotalVariation:
    """A user's own detector: a differentiable score and a threshold (95th percentile of clean images)."""

    def __init__(self, clean: torch.Tensor) -> None:
        self.threshold_ = float(self.score_torch(clean).quantile(0.95))

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
        return rows + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)


class OtherModelsDetector(TotalVariation):
    def __init__(self, clean: torch.Tensor, model: nn.Module) -> None:
        super().__init__(clean)
        self.model = model


def _classifier(model: nn.Module) -> PyTorchClassifier:
    return PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
    )


def test_generate_returns_numpy_within_budget_and_reports_each_bypass(
    digits, digits_cnn, digits_correct
) -> None:
    x, y = (t[:40].numpy() for t in digits_correct)
    x_copy = x.copy()
    detector = TotalVariation(digits.x_train)
    attack = DetectorAwarePGD(
        _classifier(digits_cnn), detector, eps=0.3, eps_step=0.03, max_iter=50, batch_size=16
    )
    x_adv = attack.generate(x, np.eye(10, dtype=np.float32)[y])  # one-hot labels, as ART passes them
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and np.array_equal(x, x_copy)
    assert np.abs(x_adv - x).max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        misclassified = digits_cnn(torch.as_tensor(x_adv)).argmax(1).numpy() != y
    accepted = detector.score_torch(torch.as_tensor(x_adv)).numpy() <= detector.threshold_
    assert np.array_equal(attack.last_bypassed, misclassified & accepted)
    assert attack.last_bypassed.mean() >= 0.95  # measured 1.00 (plain PGD at this budget: 0.83)


def test_a_detector_without_a_differentiable_score_or_of_another_model_is_refused(digits, digits_cnn) -> None:
    classifier = _classifier(digits_cnn)
    with pytest.raises(TypeError, match=r"detector: a fitted detector with a differentiable score_torch"):
        DetectorAwarePGD(classifier, object())
    unfitted = TotalVariation(digits.x_train)
    unfitted.threshold_ = float("nan")
    with pytest.raises(TypeError, match=r"fit and calibrate it first"):
        DetectorAwarePGD(classifier, unfitted)
    other = OtherModelsDetector(digits.x_train, nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    with pytest.raises(ValueError, match=r"detector: it was fitted on another model than the classifier's"):
        DetectorAwarePGD(classifier, other)
    with pytest.raises(ValueError, match=r"batch_size must be an int > 0; got 0"):
        DetectorAwarePGD(classifier, TotalVariation(digits.x_train), batch_size=0)


def test_the_registry_builds_it_with_a_fitted_detector_and_refuses_it_without(
    digits, digits_cnn, digits_correct
) -> None:
    from xaiadv.bridge.registry import ParameterError, attack_parameters, available_attacks, build_attack

    assert "xaiadv:DetectorAwarePGD" in available_attacks("xaiadv")
    assert {"detector", "norm", "eps", "eps_step", "max_iter", "search_steps"} <= set(
        attack_parameters("xaiadv:DetectorAwarePGD")
    )
    with pytest.raises(ParameterError, match=r"^detector: xaiadv:DetectorAwarePGD needs a fitted detector"):
        build_attack("xaiadv:DetectorAwarePGD", model=digits_cnn, eps=0.3)
    x, y = digits_correct[0][:20], digits_correct[1][:20]
    detector = TotalVariation(digits.x_train)
    attack = build_attack(
        "xaiadv:DetectorAwarePGD", model=digits_cnn, detector=detector, eps=0.3, eps_step=0.03, max_iter=50
    )
    x_adv = attack(x, y)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    with torch.no_grad():
        misclassified = digits_cnn(x_adv).argmax(1) != y
    accepted = detector.score_torch(x_adv) <= detector.threshold_
    assert float((misclassified & accepted).float().mean()) >= 0.95  # measured 1.00, as the ART class
    other = OtherModelsDetector(digits.x_train, nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    with pytest.raises(ValueError, match=r"detector: it was fitted on another model"):
        build_attack("xaiadv:DetectorAwarePGD", model=digits_cnn, detector=other)
