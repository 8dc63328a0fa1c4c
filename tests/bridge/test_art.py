"""The ART adapters, driven as ART drives its own evasion attacks, on the digits-trained tiny CNN."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from art.attacks.attack import EvasionAttack
from art.attacks.evasion import BasicIterativeMethod
from art.defences.preprocessor import FeatureSqueezing
from art.defences.trainer import AdversarialTrainer
from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
from art.exceptions import EstimatorError
from torch import nn

from xaiadv.bridge.art import LRPFlip, LRPGrad, LRPGradMean, LRPMean
from xaiadv.plugins.attacks import ATTACK_PARAMS, lrp_grad, top_relevant
from xaiadv.plugins.relevance import Relevance

pytestmark = pytest.mark.usefixtures("one_thread")

#: Per attack: parameters and the share of the 100 correctly classified test digits it must fool.
#: Measured: flip 0.94, mean 0.80, grad 0.98, grad+mean 0.98; floors a little below.
ATTACKS: dict[type[EvasionAttack], tuple[dict[str, Any], float]] = {
    LRPFlip: ({"max_iter": 12}, 0.85),
    LRPMean: ({"eps": 0.05, "n_batch": 0.3, "max_iter": 20}, 0.7),
    LRPGrad: ({"eps": 0.02, "max_iter": 20}, 0.9),
    LRPGradMean: ({"eps": 0.02, "max_iter": 20}, 0.9),
}
PATTERN = {LRPFlip: "flip", LRPMean: "mean", LRPGrad: "grad", LRPGradMean: "grad_mean"}
GRAD = ATTACKS[LRPGrad][0]
MEAN, STD = 0.3, 0.4


def make_classifier(model: nn.Module, **kwargs: Any) -> PyTorchClassifier:
    shape = kwargs.pop("input_shape", (1, 8, 8))
    classes = kwargs.pop("nb_classes", 10)
    kwargs.setdefault("clip_values", (0.0, 1.0))
    return PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=classes, **kwargs
    )


@pytest.fixture(scope="module")
def classifier(digits_cnn: nn.Module) -> PyTorchClassifier:
    return make_classifier(digits_cnn)


@pytest.fixture(scope="module")
def data(digits_correct) -> tuple[np.ndarray, np.ndarray]:
    """The 100 correctly classified test digits as ART takes them: float32 numpy and class indices."""
    x, y = digits_correct
    return x.numpy(), y.numpy()


def predict(classifier: PyTorchClassifier, x: np.ndarray) -> np.ndarray:
    return classifier.predict(x.astype(np.float32)).argmax(1)


def one_hot(y: np.ndarray, classes: int = 10) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[y]


# --- the ART attack contract -------------------------------------------------------------------------


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.__name__)
def test_attacks_are_art_evasion_attacks_listing_their_parameters(attack_cls, classifier) -> None:
    attack = attack_cls(classifier)

    assert issubclass(attack_cls, EvasionAttack) and isinstance(attack, EvasionAttack)
    plugin = ATTACK_PARAMS[PATTERN[attack_cls]]
    assert set(attack_cls.attack_params) == {*plugin, "batch_size", "verbose"}
    assert all(getattr(attack, key) == value for key, value in plugin.items())
    assert (attack.batch_size, attack.verbose) == (128, False)
    assert attack.estimator is classifier


def test_set_params_sets_known_parameters_and_generate_uses_them(classifier, data) -> None:
    x, y = data
    attack = LRPGrad(classifier, **GRAD)
    new = {"max_iter": 2, "early_stop": False, "trace": True, "batch_size": 7, "eps": 0.01}
    attack.set_params(**new)

    assert {key: getattr(attack, key) for key in new} == new
    x_adv = attack.generate(x[:10], y[:10])
    assert attack.last_result.trace.success.shape == (3, 10)
    assert bool((attack.last_result.iterations == 2).all())
    assert float(np.abs(x_adv - x[:10]).max()) <= 2 * 0.01 + 1e-6


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"steps": 3}, 'attribute "steps" cannot be set'),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": -0.1}, "eps must be > 0"),
        ({"n_batch": 0}, "n_batch must be > 0"),
        ({"n_batch": 1.5}, r"fraction of the input size in \(0, 1\]"),
        ({"max_iter": 0}, "max_iter must be an int > 0"),
        ({"batch_size": 0}, "batch_size must be an int > 0"),
        ({"verbose": "yes"}, "verbose must be a bool"),
        ({"max_iter": 3, "composite": "nope"}, "composite must be"),
    ],
    ids=[
        "unknown",
        "eps0",
        "eps-neg",
        "n_batch0",
        "n_batch-fraction",
        "max_iter",
        "batch_size",
        "verbose",
        "composite",
    ],
)
def test_set_params_refuses_unknown_and_invalid_values_and_keeps_the_old_ones(
    params, match, classifier, data
) -> None:
    x, y = data
    attack = LRPGrad(classifier, **GRAD)
    before = {key: getattr(attack, key) for key in attack.attack_params}
    expected = attack.generate(x[:10], y[:10])

    with pytest.raises(ValueError, match=match):
        attack.set_params(**params)

    assert {key: getattr(attack, key) for key in attack.attack_params} == before
    assert np.array_equal(attack.generate(x[:10], y[:10]), expected)


@pytest.mark.parametrize(
    ("attack_cls", "params", "name"),
    [
        (LRPGrad, {"steps": 3}, "steps"),
        (LRPFlip, {"eps": 0.1}, "eps"),
        (LRPMean, {"momentum": 0.5}, "momentum"),
    ],
    ids=["grad-steps", "flip-eps", "mean-momentum"],
)
def test_unknown_keyword_at_construction_raises_type_error_naming_it(
    attack_cls, params, name, classifier
) -> None:
    with pytest.raises(TypeError, match=rf"unknown parameter\(s\) \['{name}'\] for {attack_cls.__name__}"):
        attack_cls(classifier, **params)


def test_an_estimator_that_is_not_a_pytorch_classifier_is_rejected() -> None:
    black_box = BlackBoxClassifier(
        lambda x: np.zeros((len(x), 10), dtype=np.float32),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    with pytest.raises(
        EstimatorError, match=r"LRPGrad requires an estimator derived from .*PyTorchClassifier"
    ):
        LRPGrad(black_box)


def test_a_classifier_without_clip_values_is_rejected(digits_cnn) -> None:
    with pytest.raises(ValueError, match="clip_values"):
        LRPGrad(make_classifier(digits_cnn, clip_values=None))


@pytest.mark.parametrize("attack_cls", [LRPFlip, LRPMean], ids=lambda cls: cls.__name__)
def test_untargeted_attacks_refuse_targeted(attack_cls, classifier) -> None:
    with pytest.raises(ValueError, match="cannot honour a target"):
        attack_cls(classifier, targeted=True)


def test_targeted_grad_attacks_reach_their_targets(classifier, data) -> None:
    x, y = data
    target = (y + 1) % 10
    attack = LRPGrad(classifier, targeted=True, **GRAD)
    x_adv = attack.generate(x[:30], target[:30])

    reached = predict(classifier, x_adv) == target[:30]
    assert np.array_equal(reached, attack.last_result.success.numpy())
    assert reached.mean() >= 0.5  # measured 0.63


# --- generate ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.__name__)
def test_attack_success_rate_on_correctly_classified_digits(attack_cls, classifier, data) -> None:
    x, y = data
    params, floor = ATTACKS[attack_cls]
    attack = attack_cls(classifier, **params)
    x_adv = attack.generate(x, y)

    fooled = predict(classifier, x_adv) != y
    assert np.array_equal(fooled, attack.last_result.success.numpy())
    assert fooled.mean() >= floor, f"{attack_cls.__name__} fooled only {fooled.mean():.2f}"
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.__name__)
def test_labels_as_indices_and_one_hot_give_identical_results(attack_cls, classifier, data) -> None:
    x, y = data
    params = {**ATTACKS[attack_cls][0], "max_iter": 5}
    from_indices = attack_cls(classifier, **params).generate(x[:40], y[:40])
    from_one_hot = attack_cls(classifier, **params).generate(x[:40], one_hot(y[:40]))

    assert np.array_equal(from_indices, from_one_hot)
    assert not np.array_equal(from_indices, x[:40])


def test_y_none_uses_the_classifiers_predictions(classifier, mixed_digits) -> None:
    x, label = mixed_digits.x.numpy(), mixed_digits.label.numpy()
    prediction = predict(classifier, x)
    assert np.array_equal(prediction, mixed_digits.prediction.numpy())

    without_y = LRPGrad(classifier, **GRAD).generate(x)
    with_predictions = LRPGrad(classifier, **GRAD).generate(x, prediction)
    with_labels = LRPGrad(classifier, **GRAD).generate(x, label)

    assert np.array_equal(without_y, with_predictions)
    wrong = mixed_digits.wrong.numpy()
    # A misclassified digit is already "adversarial" for its true label (left as is), not for its prediction.
    assert np.array_equal(with_labels[wrong], x[wrong])
    assert not np.array_equal(without_y[wrong], x[wrong])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_output_has_the_inputs_shape_and_dtype_and_inputs_are_unmodified(dtype, classifier, data) -> None:
    x, y = data[0][:20].astype(dtype), data[1][:20].copy()
    y_hot = one_hot(y)
    x_before, y_before, hot_before = x.copy(), y.copy(), y_hot.copy()

    x_adv = LRPGradMean(classifier, **GRAD).generate(x, y)
    LRPGrad(classifier, **GRAD).generate(x, y_hot)

    assert x_adv.dtype == dtype and x_adv.shape == x.shape and isinstance(x_adv, np.ndarray)
    assert not np.shares_memory(x_adv, x)
    assert np.array_equal(x, x_before) and np.array_equal(y, y_before) and np.array_equal(y_hot, hot_before)
    assert not np.array_equal(x_adv, x)


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.__name__)
def test_mini_batches_give_the_same_result_as_one_batch(attack_cls, classifier, data) -> None:
    x, y = data
    params = ATTACKS[attack_cls][0]
    whole = attack_cls(classifier, batch_size=len(x), **params)
    split = attack_cls(classifier, batch_size=16, **params)
    x_whole, x_split = whole.generate(x, y), split.generate(x, y)

    assert np.array_equal(x_whole, x_split)
    assert torch.equal(whole.last_result.success, split.last_result.success)
    assert torch.equal(whole.last_result.iterations, split.last_result.iterations)


def test_last_result_holds_every_sample_and_the_trace(classifier, data) -> None:
    x, y = data
    max_iter = 20
    attack = LRPGrad(classifier, batch_size=30, trace=True, **GRAD)
    x_adv = attack.generate(x, y)
    result, n = attack.last_result, len(x)

    assert result.success.shape == (n,) and result.iterations.shape == (n,)
    assert np.array_equal(result.success.numpy(), predict(classifier, x_adv) != y)
    assert bool((result.iterations >= 0).all()) and bool((result.iterations <= max_iter).all())
    trace = result.trace
    for field in ("original_probability", "success", "l0", "l1", "l2", "linf"):
        assert getattr(trace, field).shape == (max_iter + 1, n), field
    assert not bool(trace.success[0].any())
    assert torch.equal(trace.success[-1], result.success)
    linf = np.abs(x_adv - x).reshape(n, -1).max(1)
    np.testing.assert_allclose(trace.linf[-1].numpy(), linf, atol=1e-6)

    untraced = LRPGrad(classifier, **GRAD)
    untraced.generate(x[:5], y[:5])
    assert untraced.last_result.trace is None and untraced.last_result.success.shape == (5,)


# --- preprocessing -----------------------------------------------------------------------------------


def test_classifier_preprocessing_gives_the_plugins_result(digits_cnn, data) -> None:
    x, _ = data
    standardised = make_classifier(digits_cnn, preprocessing=(MEAN, STD))
    labels = predict(standardised, x)
    x_adv = LRPGrad(standardised, **GRAD).generate(x, labels)

    x_t, y_t = torch.from_numpy(x), torch.from_numpy(labels)
    expected = lrp_grad(digits_cnn, x_t, y_t, preprocessing=(MEAN, STD), **GRAD)
    ignoring = lrp_grad(digits_cnn, x_t, y_t, **GRAD)
    assert np.array_equal(x_adv, expected.x_adv.numpy())
    assert not np.array_equal(x_adv, ignoring.x_adv.numpy())


@pytest.fixture(scope="module")
def two_channel(tiny_model) -> tuple[nn.Module, torch.Tensor, np.ndarray, np.ndarray]:
    """A tiny 2-channel CNN, inputs away from the bounds, and per-channel mean/std with very unequal std."""
    model = tiny_model("cnn", channels=2, side=8, classes=5, seed=3)
    x = 0.1 + 0.8 * torch.rand(16, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    return model, x, np.array([0.2, 0.6], dtype=np.float32), np.array([0.05, 0.5], dtype=np.float32)


def test_per_channel_std_does_not_distort_the_relevance_ranking(two_channel) -> None:
    model, x, mean, std = two_channel
    classifier = make_classifier(model, input_shape=(2, 8, 8), nb_classes=5, preprocessing=(mean, std))
    labels = predict(classifier, x.numpy())
    params = {"eps": 0.05, "n_batch": 10, "max_iter": 1, "early_stop": False}
    x_adv = LRPGrad(classifier, **params).generate(x.numpy(), labels)

    expected = lrp_grad(model, x, torch.from_numpy(labels), preprocessing=(mean, std), **params)
    assert np.array_equal(x_adv, expected.x_adv.numpy())

    # One step from inputs away from the bounds changes exactly the 10 values of highest relevance, taken
    # element-wise in the model's space; ranking the relevance scaled by 1/std would pick others.
    relevance = Relevance(model, preprocessing=(mean, std))(x, torch.from_numpy(labels))
    changed = torch.from_numpy(x_adv != x.numpy())
    assert torch.equal(changed, top_relevant(relevance, 10))
    per_std = torch.from_numpy(std).view(1, 2, 1, 1)
    assert not torch.equal(changed, top_relevant(relevance / per_std, 10))


def test_a_vector_as_long_as_the_last_axis_is_broadcast_as_art_does(tiny_model) -> None:
    """ART aligns (mean, std) of length x.shape[-1] with the last axis even when the channels have that
    length too (here (N, 2, 8, 2)); the attack must see the model as the classifier computes it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 2, 5)
    ).eval()
    x = 0.1 + 0.8 * torch.rand(12, 2, 8, 2, generator=torch.Generator().manual_seed(5))
    mean, std = np.array([0.2, 0.6], dtype=np.float32), np.array([0.1, 0.5], dtype=np.float32)
    classifier = make_classifier(model, input_shape=(2, 8, 2), nb_classes=5, preprocessing=(mean, std))
    labels = predict(classifier, x.numpy())
    last_axis = (mean.reshape(1, 1, 1, 2), std.reshape(1, 1, 1, 2))
    with torch.no_grad():
        normalized = (x - torch.from_numpy(last_axis[0])) / torch.from_numpy(last_axis[1])
        np.testing.assert_allclose(classifier.predict(x.numpy()), model(normalized).numpy(), atol=1e-5)

    params = {"eps": 0.05, "n_batch": 0.3, "max_iter": 3, "early_stop": False}
    x_adv = LRPGrad(classifier, **params).generate(x.numpy(), labels)
    y = torch.from_numpy(labels)
    expected = lrp_grad(model, x, y, preprocessing=last_axis, **params)
    per_channel = lrp_grad(
        model, x, y, preprocessing=(mean.reshape(1, 2, 1, 1), std.reshape(1, 2, 1, 1)), **params
    )
    assert np.array_equal(x_adv, expected.x_adv.numpy())
    assert not np.array_equal(x_adv, per_channel.x_adv.numpy())


def test_a_preprocessing_defence_is_refused(digits_cnn, data) -> None:
    x, y = data
    defended = make_classifier(
        digits_cnn, preprocessing_defences=FeatureSqueezing(clip_values=(0, 1), bit_depth=4)
    )
    attack = LRPGrad(defended, **GRAD)
    with pytest.raises(ValueError, match=r"support only \(mean, std\) preprocessing.*FeatureSqueezing"):
        attack.generate(x[:4], y[:4])
    assert attack.last_result is None


# --- against ART's own attacks and harnesses ---------------------------------------------------------


def test_lrp_grad_on_all_values_equals_arts_basic_iterative_method(classifier, data) -> None:
    x, y = data
    eps, steps = 0.02, 10
    ours = LRPGrad(classifier, eps=eps, n_batch=1.0, max_iter=steps, early_stop=False).generate(x, y)
    art_bim = BasicIterativeMethod(
        classifier, eps=1.0, eps_step=eps, max_iter=steps, batch_size=len(x), verbose=False
    ).generate(x, one_hot(y))

    # ART adds and subtracts x when projecting onto its (inactive) eps-ball: float32 rounding only.
    np.testing.assert_allclose(ours, art_bim, rtol=0, atol=1e-6)
    assert float(np.abs(ours - x).max()) == pytest.approx(steps * eps, abs=1e-6)


def test_adversarial_trainer_runs_it_and_changes_the_weights(digits_cnn, digits) -> None:
    model = copy.deepcopy(digits_cnn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainable = make_classifier(model, optimizer=optimizer)
    attack = LRPGrad(trainable, max_iter=5)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x, y = digits.x_train[:64].numpy(), one_hot(digits.y_train[:64].numpy())

    AdversarialTrainer(trainable, attacks=attack, ratio=0.5).fit(x, y, nb_epochs=1, batch_size=32)

    assert attack.last_result is not None and attack.last_result.success.shape == (16,)
    assert any(not torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(torch.equal(value, digits_cnn.state_dict()[name]) for name, value in before.items())


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("mode", ["train", "eval", "train-frozen-bn"])
def test_model_mode_and_weights_are_as_before_generate(mode, attack_cls, tiny_model, data) -> None:
    model = tiny_model("cnn_bn")
    model.train(mode != "eval")
    if mode == "train-frozen-bn":
        model[1].eval()
    modes = [module.training for module in model.modules()]
    state = {name: value.clone() for name, value in model.state_dict().items()}
    x, y = data

    attack_cls(make_classifier(model), **{**ATTACKS[attack_cls][0], "max_iter": 3}).generate(x[:8], y[:8])

    assert [module.training for module in model.modules()] == modes
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def _spoil_last(x: np.ndarray, y: np.ndarray, case: str) -> tuple[np.ndarray, Any]:
    x, y = x.copy(), y.copy()
    if case == "nan":
        x[-1, 0, 0, 0] = np.nan
    elif case == "above-bounds":
        x[-1, 0, 0, 0] = 1.5
    elif case == "label-too-large":
        y[-1] = 10
    elif case == "label-negative":
        y[-1] = -1
    return x, {"label-scalar": np.int64(3), "label-count": y[:-1]}.get(case, y)


BAD_INPUTS = {
    "nan": "x contains NaN or Inf",
    "above-bounds": r"outside the bounds \[0.0, 1.0\]",
    "label-too-large": r"class indices in \[0, 9\]",
    "label-negative": r"class indices in \[0, 9\]",
    "label-scalar": "must be 8 labels",
    "label-count": "must be 8 labels",
    "wrong-shape": r"must be shaped \(N, 1, 8, 8\)",
    "list-x": "x must be a numpy array",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_anywhere_is_refused_before_the_first_mini_batch(
    case, tiny_model, counting_model, data
) -> None:
    """ART splits x into mini-batches; a bad value in the last one must not cost the earlier ones' work."""
    model = counting_model(tiny_model("cnn"))
    x, y = _spoil_last(data[0][:8], data[1][:8], case)
    if case == "wrong-shape":
        x = x[:, :, :7, :7]
    given_x = x.tolist() if case == "list-x" else x
    attack = LRPGrad(make_classifier(model), batch_size=2, max_iter=3)
    with pytest.raises((ValueError, TypeError), match=BAD_INPUTS[case]):
        attack.generate(given_x, y)
    assert model.calls == 0


def test_targeted_without_y_is_refused_before_any_work(tiny_model, counting_model, data) -> None:
    model = counting_model(tiny_model("cnn"))
    with pytest.raises(ValueError, match="targeted attacks need y"):
        LRPGrad(make_classifier(model), targeted=True, max_iter=3).generate(data[0][:4])
    assert model.calls == 0
