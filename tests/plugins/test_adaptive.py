"""Detector-aware PGD: bypasses a differentiable detector that plain PGD runs into, within budget."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from xaiadv.plugins.adaptive import AdaptiveConfig, _WeightSearch, detector_aware_pgd
from xaiadv.plugins.detectors import IDefender, KNNScore, LRPSignature


class TotalVariation:
    """A toy detector, differentiable and independent of the model: the images' total variation, flagged
    above the 95th percentile of clean training images (sign-gradient perturbations raise it)."""

    def __init__(self, clean: torch.Tensor) -> None:
        self.threshold_ = float(self.score_torch(clean).quantile(0.95))

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
        return rows + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)


def _bypass_rate(model: nn.Module, detector: TotalVariation, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        misclassified = model(x_adv).argmax(1) != y
    return float((misclassified & (detector.score_torch(x_adv) <= detector.threshold_)).float().mean())


def test_the_adaptive_attack_bypasses_where_plain_pgd_is_caught(digits, digits_cnn, digits_correct) -> None:
    import torchattacks

    x, y = digits_correct
    detector = TotalVariation(digits.x_train)
    pgd = torchattacks.PGD(digits_cnn, eps=0.3, alpha=0.03, steps=50, random_start=False)
    plain = _bypass_rate(digits_cnn, detector, pgd(x, y), y)
    config = AdaptiveConfig(eps=0.3, eps_step=0.03, max_iter=50, search_steps=5)
    result = detector_aware_pgd(digits_cnn, detector, x, y, config=config)
    adaptive = _bypass_rate(digits_cnn, detector, result.x_adv, y)
    assert adaptive == pytest.approx(float(result.bypassed.float().mean()))
    assert adaptive >= 0.95 and adaptive >= plain + 0.1  # measured 1.00 against plain PGD's 0.83
    assert not bool(result.flagged[result.bypassed].any())


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_budget_bounds_and_the_callers_state(norm: float, digits, digits_cnn, digits_correct) -> None:
    x, y = digits_correct[0][:20], digits_correct[1][:20]
    x_copy = x.clone()
    digits_cnn.train()
    try:
        config = AdaptiveConfig(norm=norm, eps=0.2 if norm == math.inf else 1.0, eps_step=0.05, max_iter=10)
        result = detector_aware_pgd(digits_cnn, TotalVariation(digits.x_train), x, y, config=config)
        assert digits_cnn.training and all(m.training for m in digits_cnn.modules())
    finally:
        digits_cnn.eval()
    delta = (result.x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == math.inf else delta.norm(dim=1)
    assert float(size.max()) <= config.eps + 1e-5
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    assert torch.equal(x, x_copy)


def test_the_weight_search_moves_each_way_then_bisects() -> None:
    search = _WeightSearch(torch.ones(3, dtype=torch.float64))
    misclassified = torch.tensor([True, False, True])
    flagged = torch.tensor([True, False, False])
    search.update(misclassified, flagged)  # flagged: x10; accepted but correct: /10; bypassed: kept
    assert search.weight.tolist() == [10.0, 0.1, 1.0] and search.bypassed.tolist() == [False, False, True]
    search.update(torch.tensor([False, True, True]), torch.tensor([False, True, False]))
    assert search.weight[0] == pytest.approx(math.sqrt(1.0 * 10.0))  # bounded by 1 (flagged) and 10
    assert search.weight[1] == pytest.approx(math.sqrt(0.1 * 1.0))
    assert search.used.tolist()[2] == 1.0


def test_bad_arguments_are_refused_before_any_work(digits_cnn, digits_correct) -> None:
    x, y = digits_correct[0][:2], digits_correct[1][:2]
    with pytest.raises(TypeError, match=r"detector must offer score_torch\(x\) and threshold_"):
        detector_aware_pgd(digits_cnn, object(), x, y)
    with pytest.raises(ValueError, match=r"norm must be one of inf, 2\.0; got 1"):
        AdaptiveConfig(norm=1)
    with pytest.raises(ValueError, match=r"eps must be > 0; got 0\.0"):
        AdaptiveConfig(eps=0.0)
    with pytest.raises(ValueError, match="max_iter must be an int > 0; got 0"):
        AdaptiveConfig(max_iter=0)


#: detector -> (its factory on a model, the adaptive bypass floor, the margin over plain PGD it must beat by).
#: Measured at 5% FPR, L-inf eps 0.2 on 40 digits, adaptive vs plain PGD: I-defender (seed 002, per-class
#: thresholds of eq. 5) 0.85 vs 0.225; DW-kNN 0.975 vs 0.775 (0.70 when differentiated exactly through its k
#: neighbours, whose gradient vanishes when none has the predicted class); kNN with uniform weights 0.975 vs
#: 0.80 (0.775 while a score tied with the threshold, which the mean neighbour distance may still flag,
#: stopped the attack); LRP signatures 0.80 vs 0.325.
AGAINST: dict[str, tuple[Callable[[nn.Module], Any], float, float]] = {
    "IDefender": (lambda model: IDefender(model), 0.75, 0.4),
    "DW-kNN": (lambda model: KNNScore(model, k=10, weighting="distance"), 0.92, 0.1),
    "kNN": (lambda model: KNNScore(model, k=10), 0.92, 0.1),
    "LRPSignature": (lambda model: LRPSignature(model), 0.72, 0.3),
}


@pytest.mark.parametrize("name", list(AGAINST))
def test_against_each_detector_the_adaptive_attack_beats_plain_pgd(
    name: str, digits, digits_cnn, digits_correct
) -> None:
    import torchattacks

    build, floor, margin = AGAINST[name]
    x, y = digits_correct[0][:40], digits_correct[1][:40]
    detector = build(digits_cnn).fit_calibrated(digits.x_train, digits.y_train, fpr=0.05)
    x_pgd = torchattacks.PGD(digits_cnn, eps=0.2, alpha=0.02, steps=30, random_start=False)(x, y)
    with torch.no_grad():
        plain = float(((digits_cnn(x_pgd).argmax(1) != y) & ~detector.detect(x_pgd)).float().mean())
    config = AdaptiveConfig(eps=0.2, eps_step=0.02, max_iter=30, search_steps=4)
    result = detector_aware_pgd(digits_cnn, detector, x, y, config=config)
    adaptive = float(result.bypassed.float().mean())
    assert torch.equal(result.flagged, detector.detect(result.x_adv))
    assert adaptive >= floor and adaptive >= plain + margin, (adaptive, plain)


class _TiedDetector:
    """Score 0.5 everywhere, threshold 0.5; ``tie_break_threshold_`` says ties are split by a second score."""

    threshold_ = 0.5

    def __init__(self, splits_ties: bool) -> None:
        self.tie_break_threshold_ = 0.0 if splits_ties else None

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.0 * x.flatten(1).sum(1)


@pytest.mark.parametrize("splits_ties", [False, True])
def test_a_score_tied_with_the_threshold_is_accepted_only_without_a_tie_break(
    splits_ties: bool, digits_cnn, digits_correct
) -> None:
    """A detector that flags score > threshold accepts a tie; one that splits ties by a second score may
    flag it, so the attack keeps pushing (a sample stopped at the tie stayed flagged, issue 14)."""
    from xaiadv.plugins.adaptive import loss_gradient
    from xaiadv.plugins.model import Classifier

    classifier = Classifier.wrap(digits_cnn)
    x = digits_correct[0][:8]
    with torch.no_grad():
        wrong = (digits_cnn(x).argmax(1) + 1) % 10  # every sample counts as misclassified
    weight = torch.ones(len(x), dtype=torch.float64)
    _, done = loss_gradient(classifier, _TiedDetector(splits_ties), x, wrong, weight, AdaptiveConfig())
    assert done.tolist() == [not splits_ties] * len(x)
