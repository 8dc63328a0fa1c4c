"""The one Detector contract (plugins/detectors/base.py), checked alike for every detector and, through
ART's calling convention, for every ART adapter: fit/score/calibrate/detect and the state round trip,
NotFittedError, re-batching invariance, no hook left and every module's train/eval flag restored (also after
an exception), the caller's tensors, arrays and model untouched.

A detector added to ``xaiadv.plugins.detectors.DETECTORS`` fails ``test_every_detector_has_a_case`` until it
gets a case here; the tests then run for it too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from sklearn.exceptions import NotFittedError
from torch import nn

from xaiadv.bridge.art_detectors import (
    IDefenderDetector,
    KNNDetector,
    LRPSignatureDetector,
    SpatialEntropyDetector,
)
from xaiadv.plugins import storage
from xaiadv.plugins.calibration import held_out_split
from xaiadv.plugins.detectors import DETECTORS, Detector, IDefender, KNNScore, LRPSignature, SpatialEntropy
from xaiadv.plugins.model import Classifier

#: name -> a detector on a model; small settings where the method's defaults cost seconds (I-defender's
#: full covariance in 256 dimensions). "KNNScore-distance": DW-kNN (1/d^2 weights) on PCA-whitened features.
CASES: dict[str, Callable[[Any], Detector]] = {
    "SpatialEntropy": lambda model: SpatialEntropy(model),
    "IDefender": lambda model: IDefender(model, n_components=1, covariance_type="diag"),
    "LRPSignature": lambda model: LRPSignature(model, n_components=1, covariance_type="diag"),
    "KNNScore": lambda model: KNNScore(model, k=5),
    "KNNScore-distance": lambda model: KNNScore(model, k=5, weighting="distance", preprocess="pca"),
}
#: The ART adapters with the same settings.
ART_CASES: dict[str, Callable[[PyTorchClassifier], Any]] = {
    "SpatialEntropyDetector": lambda classifier: SpatialEntropyDetector(classifier),
    "IDefenderDetector": lambda classifier: IDefenderDetector(
        classifier, n_components=1, covariance_type="diag"
    ),
    "KNNDetector": lambda classifier: KNNDetector(classifier, k=5),
    "LRPSignatureDetector": lambda classifier: LRPSignatureDetector(
        classifier, n_components=1, covariance_type="diag"
    ),
}
DIFFERENTIABLE = {"IDefender", "KNNScore", "KNNScore-distance", "LRPSignature", "SpatialEntropy"}
FPR = 0.1


class Tripwire(nn.Module):
    """Identity that raises in the forward pass when armed: an exception in the middle of the work."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("tripwire")
        return x


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.fixture(scope="module")
def model(digits_cnn: nn.Module) -> nn.Sequential:
    """The digits CNN behind a tripwire, in training mode except for one module: flags to restore exactly
    (it has neither dropout nor batch norm, so its outputs do not depend on the mode)."""
    wrapped = nn.Sequential(Tripwire(), *copy.deepcopy(digits_cnn)).train()
    wrapped[3].eval()
    return wrapped


@pytest.fixture(scope="module")
def split(digits) -> dict[str, torch.Tensor]:
    return {
        "x": digits.x_train[:500],
        "y": digits.y_train[:500],
        "x_cal": digits.x_test[:250],
        "y_cal": digits.y_test[:250],
        "x_query": digits.x_test[250:350],
    }


@pytest.fixture(scope="module")
def fitted(model: nn.Sequential, split: dict[str, torch.Tensor]) -> dict[str, Detector]:
    """Every case fitted on 500 training digits and calibrated at FPR on 250 test digits."""
    return {
        name: build(model).fit(split["x"], split["y"]).calibrate(split["x_cal"], fpr=FPR)
        for name, build in CASES.items()
    }


def expected_flags(decision: Any) -> torch.Tensor:
    """The documented rule: score > threshold; ties with the threshold split by the tie-break score."""
    flags = decision.score > decision.threshold
    if decision.tie_break is not None:
        flags |= (decision.score == decision.threshold) & (decision.tie_break > decision.tie_break_threshold)
    return flags


def test_every_detector_has_a_case(model: nn.Sequential) -> None:
    assert {type(build(model)) for build in CASES.values()} == set(DETECTORS.values())
    assert all(issubclass(cls, Detector) for cls in DETECTORS.values())


@pytest.mark.parametrize("name", CASES)
def test_not_fitted_error_before_fit_and_before_calibrate(name: str, model, split) -> None:
    detector = CASES[name](model)
    for call in (detector.score, detector.detect, detector.calibrate, detector.decide):
        with pytest.raises(NotFittedError, match=r"not fitted yet: call fit\(x, y\) first"):
            call(split["x_query"])
    with pytest.raises(NotFittedError, match="not fitted yet"):
        detector.get_state()
    detector.fit(split["x"], split["y"])
    with pytest.raises(NotFittedError, match=r"fitted but not calibrated yet: call calibrate\(x_clean\)"):
        detector.detect(split["x_query"])
    with pytest.raises(NotFittedError, match="not calibrated"):
        detector.recalibrate(fpr=FPR)
    assert detector.score(split["x_query"]).shape == (100,)  # scoring needs no threshold


@pytest.mark.parametrize("name", CASES)
def test_fit_score_calibrate_detect(name: str, model, split) -> None:
    detector = CASES[name](model)
    assert detector.fit(split["x"], split["y"]) is detector
    assert detector.calibrate(split["x_cal"], fpr=FPR) is detector
    score = detector.score(split["x_query"])
    assert score.dtype == torch.float64 and score.shape == (100,) and bool(torch.isfinite(score).all())
    assert score.grad_fn is None
    decision = detector.decide(split["x_query"])
    assert torch.equal(decision.score, score)
    assert torch.equal(decision.flags, expected_flags(decision))
    assert torch.equal(detector.detect(split["x_query"]), decision.flags)
    assert decision.flags.dtype == torch.bool and 0 < int(decision.flags.sum()) < 100
    # on the calibration images: at most FPR flagged (per class when per class); the threshold is the
    # smallest such score, so counting the samples at it as well exceeds FPR - 1/n (the scores tie)
    clean = detector.decide(split["x_cal"])
    at = clean.score == clean.threshold
    if clean.tie_break is not None:
        at &= clean.tie_break == clean.tie_break_threshold
    classes = detector.calibration_["class"]
    groups = [classes == label for label in range(10)] if detector.per_class_ else [np.ones(250, bool)]
    for members in map(torch.from_numpy, groups):
        n = int(members.sum())
        assert clean.flags[members].double().mean() <= FPR
        assert (clean.flags | at)[members].double().mean() > FPR - 1 / n
    # the paper's rule: per class for I-defender (and LRPSignature, its recipe on relevance) only
    assert detector.per_class_ == (name in ("IDefender", "LRPSignature"))


@pytest.mark.parametrize("name", CASES)
def test_per_class_by_labels_or_predictions_and_recalibrate(name: str, fitted, split) -> None:
    detector = copy.copy(fitted[name])
    detector.calibrate(split["x_cal"], split["y_cal"], fpr=0.2, per_class=True)
    assert detector.per_class_ and np.shape(detector.threshold_) == (10,)
    np.testing.assert_array_equal(detector.calibration_["class"], split["y_cal"].numpy())  # grouped by y
    by_labels = np.asarray(detector.threshold_).copy()
    decision = detector.decide(split["x_query"])
    with torch.no_grad():
        predicted = detector.classifier.logits(split["x_query"]).argmax(1)
    assert torch.equal(
        decision.threshold, torch.as_tensor(detector.threshold_)[predicted]
    )  # detect: predicted
    detector.calibrate(split["x_cal"], fpr=0.2, per_class=True)  # grouped by the predicted class
    with torch.no_grad():
        predicted_cal = detector.classifier.logits(split["x_cal"]).argmax(1).numpy()
    np.testing.assert_array_equal(detector.calibration_["class"], predicted_cal)
    assert np.shape(detector.threshold_) == np.shape(by_labels) == (10,)
    detector.calibrate(split["x_cal"], fpr=0.05, per_class=False)
    global_threshold = detector.threshold_, detector.tie_break_threshold_
    detector.calibrate(split["x_cal"], fpr=0.3, per_class=False)
    detector.recalibrate(fpr=0.05)  # no forward pass: the kept clean scores
    assert (detector.threshold_, detector.tie_break_threshold_) == global_threshold
    assert detector.fpr_ == 0.05 and not detector.per_class_


@pytest.mark.parametrize("name", CASES)
def test_a_refused_calibration_changes_nothing(name: str, fitted, split) -> None:
    detector = copy.copy(fitted[name])
    before = (detector.threshold_, detector.fpr_, detector.calibration_)
    without_nine = split["y_cal"] != 9
    x, y = split["x_cal"][without_nine], split["y_cal"][without_nine]
    with pytest.raises(ValueError, match="class 9 has no clean calibration samples"):
        detector.calibrate(x, y, fpr=0.2, per_class=True)
    with pytest.raises(ValueError, match=r"fpr must be a number in \(0, 1\)"):
        detector.calibrate(x, fpr=1.0)
    with pytest.raises(ValueError, match="per_class must be a bool"):
        detector.calibrate(x, per_class="yes")
    with pytest.raises(ValueError, match=r"x must be shaped \(N, 1, 8, 8\) as in fit"):
        detector.calibrate(x[:, :, :6])
    with pytest.raises(ValueError, match="x is empty"):
        detector.calibrate(x[:0])
    with pytest.raises(ValueError, match=r"y must be \d+ labels"):
        detector.calibrate(x, y[:-1])
    assert (
        detector.threshold_ is before[0] and detector.fpr_ == before[1] and detector.calibration_ is before[2]
    )


@pytest.mark.parametrize("name", CASES)
def test_state_round_trip_gives_equal_scores_and_flags(
    name: str, fitted, model, split, tmp_path: Path
) -> None:
    detector = fitted[name]
    arrays, state = detector.get_state()
    assert all(isinstance(value, np.ndarray) for value in arrays.values())
    state = json.loads(json.dumps(state))  # JSON-able, and nothing lost on the way
    storage.save_record(tmp_path / "state", arrays, {"state": state})  # the format the adapters save in
    loaded_arrays, record, version = storage.load_record(tmp_path / "state")
    assert version == storage.SCHEMA_VERSION and record == {"state": state}
    restored = type(detector).from_state(model, loaded_arrays, record["state"], batch_size=64)
    assert repr(restored) == repr(detector) and restored.batch_size == 64
    x = split["x_query"]
    assert torch.equal(restored.score(x), detector.score(x))
    assert torch.equal(restored.detect(x), detector.detect(x))
    np.testing.assert_array_equal(restored.threshold_, detector.threshold_)
    assert restored.tie_break_threshold_ == detector.tie_break_threshold_ and restored.fpr_ == detector.fpr_
    again_arrays, again_state = restored.get_state()
    assert again_state == state and again_arrays.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(again_arrays[key], value)
    restored.recalibrate(fpr=0.3)  # the calibration scores came along
    assert restored.detect(x).sum() > detector.detect(x).sum()
    with pytest.raises(ValueError, match=f"state must be the dict {type(detector).__name__}.get_state"):
        type(detector).from_state(model, arrays, {**state, "detector": "Other"})


@pytest.mark.parametrize("name", CASES)
def test_scores_do_not_depend_on_the_batch_size(name: str, fitted, split) -> None:
    detector = copy.copy(fitted[name])
    x = torch.cat([split["x_query"], split["x"][:3]])  # three fitting images: exact matches for the kNN
    detector.batch_size = 64
    scores, flags = detector.score(x), detector.detect(x)
    detector.batch_size = 7
    assert torch.equal(detector.score(x), scores)
    assert torch.equal(detector.detect(x), flags)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(detector.score(x[order]), scores[order], rtol=1e-12, atol=1e-12)
    assert detector.score(x[:0]).shape == (0,) and detector.detect(x[:0]).shape == (0,)


@pytest.mark.parametrize("name", CASES)
def test_no_hooks_modes_restored_and_inputs_untouched(name: str, model, split, assert_no_hooks) -> None:
    flags = training_flags(model)
    parameters = {key: value.clone() for key, value in model.state_dict().items()}
    copies = {key: value.clone() for key, value in split.items()}
    detector = CASES[name](model).fit(split["x"], split["y"]).calibrate(split["x_cal"], split["y_cal"])
    detector.decide(split["x_query"])
    type(detector).from_state(model, *detector.get_state()).score(split["x_query"])
    if name in DIFFERENTIABLE:
        query = split["x_query"].clone().requires_grad_()
        torch.autograd.grad(detector.score_torch(query).sum(), query)  # a gradient w.r.t. x only
    assert training_flags(model) == flags
    assert_no_hooks(model)
    assert all(torch.equal(value, split[key]) for key, value in copies.items())
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in parameters.items())
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("name", CASES)
def test_after_an_exception_too(name: str, fitted, model, split, assert_no_hooks, count_hooks) -> None:
    detector = fitted[name]
    flags = training_flags(model)
    model[0].armed = True
    try:
        for call in (detector.score, detector.detect, lambda x: CASES[name](model).fit(x, split["y"][:100])):
            with pytest.raises(RuntimeError, match="tripwire"):
                call(split["x"][:100])
            assert training_flags(model) == flags
            assert_no_hooks(model)
    finally:
        model[0].armed = False
    handle = model[1].register_forward_hook(lambda *args: None)  # the hook check can see a hook
    assert count_hooks(model) == 1
    handle.remove()


@pytest.mark.parametrize("name", CASES)
def test_score_torch_is_the_score_with_a_gradient_or_refused(name: str, fitted, split) -> None:
    detector, x = fitted[name], split["x_query"][:20].clone().requires_grad_()
    if name not in DIFFERENTIABLE:
        with pytest.raises(NotImplementedError, match=r"piecewise.constant"):
            detector.score_torch(x)
        return
    score = detector.score_torch(x)
    assert score.grad_fn is not None
    torch.testing.assert_close(score.detach(), detector.score(x), rtol=1e-12, atol=1e-12)
    (gradient,) = torch.autograd.grad(score.sum(), x)
    assert bool(torch.isfinite(gradient).all()) and float(gradient.abs().sum()) > 0


@pytest.mark.parametrize("name", CASES)
def test_fit_calibrated_is_the_split_then_fit_then_calibrate(name: str, model, split) -> None:
    x, y = split["x"], split["y"]
    together = CASES[name](model).fit_calibrated(x, y, fpr=FPR, calibration_share=0.25, random_state=3)
    fit_rows, held_rows = held_out_split(y.numpy(), 0.25, 3)
    by_hand = CASES[name](model).fit(x[fit_rows], y[fit_rows]).calibrate(x[held_rows], fpr=FPR)
    np.testing.assert_array_equal(together.threshold_, by_hand.threshold_)
    assert torch.equal(together.score(split["x_query"]), by_hand.score(split["x_query"]))
    other = CASES[name](model).fit_calibrated(x, y, fpr=FPR, x_calibration=split["x_cal"])
    np.testing.assert_array_equal(other.calibration_["score"], other.score(split["x_cal"]).numpy())
    with pytest.raises(ValueError, match="x_calibration: expected at least one clean sample"):
        CASES[name](model).fit_calibrated(x, y, x_calibration=split["x_cal"][:0])


def test_a_classifier_or_a_module_with_preprocessing(model, split) -> None:
    """The plugins take a Classifier; a plain module with preprocessing is wrapped into the same."""
    mean, std = 0.25, 2.0
    raw = split["x"] * std + mean
    by_module = KNNScore(model, k=5, preprocessing=(mean, std)).fit(raw, split["y"])
    by_classifier = KNNScore(Classifier(model, bounds=(mean, mean + std), preprocessing=(mean, std)), k=5)
    by_classifier.fit(raw, split["y"])
    plain = KNNScore(model, k=5).fit(split["x"], split["y"])
    query = split["x_query"]
    assert torch.equal(by_module.score(query * std + mean), by_classifier.score(query * std + mean))
    torch.testing.assert_close(by_module.score(query * std + mean), plain.score(query), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="a Classifier already holds them"):
        KNNScore(by_classifier.classifier, preprocessing=(mean, std))


# --- the ART adapters, in ART's calling convention ----------------------------------------------------


@pytest.fixture(scope="module")
def art_fitted(model: nn.Sequential, split) -> dict[str, Any]:
    classifier = PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
    )
    fitted = {name: build(classifier) for name, build in ART_CASES.items()}
    for detector in fitted.values():
        detector.fit(split["x"].numpy(), split["y"].numpy(), x_calibration=split["x_cal"].numpy())
    return fitted


@pytest.mark.parametrize("name", ART_CASES)
def test_art_adapter_keeps_the_contract(
    name: str, art_fitted, model, split, assert_no_hooks, tmp_path
) -> None:
    detector = art_fitted[name]
    flags = training_flags(model)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        ART_CASES[name](detector.classifier).detect(split["x_query"].numpy())
    x = np.concatenate([split["x_query"].numpy(), split["x"][:3].numpy()])
    before = x.copy()
    report, flagged = detector.detect(x, batch_size=64)
    small, small_flagged = detector.detect(x, batch_size=7)
    np.testing.assert_array_equal(small["score"], report["score"])
    np.testing.assert_array_equal(small_flagged, flagged)
    # the adapter converts: the plugin's own decision, as numpy
    np.testing.assert_array_equal(flagged, detector.plugin_.detect(torch.from_numpy(x)).numpy())
    detector.save(tmp_path / "detector")
    loaded = type(detector).load(tmp_path / "detector", detector.classifier)
    loaded_report, loaded_flagged = loaded.detect(x)
    np.testing.assert_array_equal(loaded_report["score"], report["score"])
    np.testing.assert_array_equal(loaded_flagged, flagged)
    np.testing.assert_array_equal(x, before)
    assert training_flags(model) == flags
    assert_no_hooks(model)
