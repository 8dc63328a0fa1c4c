"""Input validation of the attacks (plugins/checks.py, AttackConfig): every bad input is refused with a
message naming it, leaving the caller's tensors, the model and its hooks as they were; odd but valid
inputs work."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.plugins.attacks import AttackResult, ifgsm_noise, lrp_flip, lrp_grad, lrp_grad_mean, lrp_mean
from xaiadv.plugins.checks import check_bounds, check_inputs, check_labels

Factory = Callable[..., nn.Module]
ATTACKS: dict[str, Callable[..., AttackResult]] = {
    "flip": lrp_flip,
    "mean": lrp_mean,
    "grad": lrp_grad,
    "grad_mean": lrp_grad_mean,
    "ifgsm_noise": ifgsm_noise,
}
QUICK = {"max_iter": 3}


def batch(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def snapshot(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else np.array(value, copy=True)


def assert_unchanged(before: Any, after: Any) -> None:
    if isinstance(after, torch.Tensor):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    else:
        np.testing.assert_array_equal(np.asarray(after), before)


@dataclass(frozen=True)
class BadInput:
    """One refused call: how x, y and the parameters are spoiled, and the message expected."""

    match: str
    x: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    y: Any = field(default_factory=lambda: [1, 2])
    params: dict[str, Any] = field(default_factory=dict)
    error: type[Exception] = ValueError
    before_any_work: bool = True


def with_value(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def spoil(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[0, 0, 3, 4] = value
        return x

    return spoil


# Refused by every attack (flip takes no eps: its own cases below).
INPUT_CASES = {
    "nan": BadInput("x contains NaN or Inf", x=with_value(float("nan"))),
    "inf": BadInput("x contains NaN or Inf", x=with_value(float("inf"))),
    "above-bounds": BadInput(r"outside the bounds \[0.0, 1.0\]", x=with_value(1.5)),
    "below-custom-bounds": BadInput(
        r"outside the bounds \[-1.0, 1.0\]", x=lambda x: 2 * x - 1.25, params={"bounds": (-1.0, 1.0)}
    ),
    "inverted-bounds": BadInput("bounds must be finite with low < high", params={"bounds": (1.0, 0.0)}),
    "integer-x": BadInput("floating-point tensor", x=lambda x: (x * 16).long(), error=TypeError),
    "numpy-x": BadInput("must be a torch.Tensor", x=lambda x: x.numpy(), error=TypeError),
    "unbatched-x": BadInput("must be a batch shaped", x=lambda x: x[0, 0, 0]),
    "wrong-shape": BadInput(
        r"forward failed on x \(shape \(2, 1, 7, 7\)", x=lambda x: x[:, :, :7, :7], before_any_work=False
    ),
    # The class count comes from the model's first forward: only the checks that need it run after one.
    "label-too-large": BadInput(r"class indices in \[0, 9\]", y=[10, 1], before_any_work=False),
    "label-one-hot-too-narrow": BadInput(
        r"one-hot \(N, 10\); got shape \(2, 5\)", y=np.eye(5)[[1, 2]], before_any_work=False
    ),
    "label-negative": BadInput("class indices >= 0", y=[-1, 1]),
    "label-non-integer": BadInput("non-integer", y=[1.5, 2.0]),
    "label-count": BadInput("must be 2 labels", y=[1, 2, 3]),
    "label-scalar": BadInput("must be 2 labels", y=np.int64(3)),
    "label-bool": BadInput("booleans", y=[True, False]),
    "label-bad-one-hot": BadInput("must be one-hot", y=np.full((2, 10), 0.5)),
    "n_batch-zero": BadInput("n_batch must be > 0", params={"n_batch": 0}),
    "n_batch-negative": BadInput("n_batch must be > 0", params={"n_batch": -3}),
    "n_batch-too-large": BadInput("at most the input size 64", params={"n_batch": 65}),
    "n_batch-fraction-above-one": BadInput(
        r"fraction of the input size in \(0, 1\]", params={"n_batch": 1.5}
    ),
    "n_batch-fraction-zero": BadInput(r"fraction of the input size in \(0, 1\]", params={"n_batch": 0.0}),
    "max_iter-zero": BadInput("max_iter must be an int > 0", params={"max_iter": 0}),
    "max_iter-negative": BadInput("max_iter must be an int > 0", params={"max_iter": -2}),
    "max_iter-float": BadInput("max_iter must be an int > 0", params={"max_iter": 2.0}),
    "relevance_every-zero": BadInput("relevance_every must be an int > 0", params={"relevance_every": 0}),
    "unknown-composite": BadInput(
        "composite must be .*epsilon_plus_flat", params={"composite": "lrp_nonsense"}
    ),
    "unknown-keyword": BadInput(
        r"unknown parameter\(s\) \['epsilon'\]", params={"epsilon": 0.1}, error=TypeError
    ),
}
EPS_CASES = {
    "eps-zero": BadInput("eps must be > 0", params={"eps": 0.0}),
    "eps-negative": BadInput("eps must be > 0", params={"eps": -0.1}),
    "eps-nan": BadInput("eps must be a finite number", params={"eps": float("nan")}),
    "eps-inf": BadInput("eps must be a finite number", params={"eps": float("inf")}),
}
ONLY_RELEVANCE = {"n_batch", "composite", "relevance_every"}  # noise IFGSM has none of these parameters


def cases_for(name: str) -> list[Any]:
    cases = dict(INPUT_CASES) | ({} if name == "flip" else EPS_CASES)
    if name == "ifgsm_noise":
        cases = {key: case for key, case in cases.items() if not ONLY_RELEVANCE & set(case.params)}
    return [pytest.param(name, case, id=f"{name}-{key}") for key, case in cases.items()]


ALL_CASES = [param for name in ATTACKS for param in cases_for(name)]


@pytest.mark.parametrize(("name", "case"), ALL_CASES)
def test_bad_input_is_refused_cleanly(
    name: str,
    case: BadInput,
    tiny_model: Factory,
    assert_no_hooks: Callable[[nn.Module], None],
    counting_model: type[nn.Module],
) -> None:
    model = counting_model(tiny_model("cnn_bn")).train()
    flags = training_flags(model)
    x = case.x(batch())
    x_before, y_before = snapshot(x), snapshot(case.y)
    with pytest.raises(case.error, match=case.match):
        ATTACKS[name](model, x, case.y, **{**QUICK, **case.params})
    assert_unchanged(x_before, x)
    assert_unchanged(y_before, case.y)
    assert_no_hooks(model)
    assert training_flags(model) == flags
    assert model.calls == 0 or not case.before_any_work


@pytest.mark.parametrize("name", ["grad", "grad_mean", "ifgsm_noise"])
def test_targeted_without_labels_is_refused(
    name: str, tiny_model: Factory, counting_model: type[nn.Module]
) -> None:
    model = counting_model(tiny_model("cnn"))
    with pytest.raises(ValueError, match="targeted attacks need y"):
        ATTACKS[name](model, batch(), targeted=True)
    assert model.calls == 0


@pytest.mark.parametrize("momentum", [-0.5, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_bad_momentum_is_refused(momentum: float, tiny_model: Factory) -> None:
    with pytest.raises(ValueError, match="momentum must be a finite number >= 0"):
        lrp_grad(tiny_model("cnn"), batch(), momentum=momentum)


@pytest.mark.parametrize(
    ("param", "value"),
    [("early_stop", 1), ("trace", "yes"), ("flip_back", None)],
    ids=["early_stop", "trace", "flip_back"],
)
def test_flags_must_be_bools(param: str, value: Any, tiny_model: Factory) -> None:
    with pytest.raises(ValueError, match=f"{param} must be a bool"):
        lrp_flip(tiny_model("cnn"), batch(), **{param: value})


# ---------------------------------------------------------------- valid but unusual inputs


def label_forms() -> dict[str, Any]:
    labels = np.array([3, 7, 1])
    return {
        "(N,)-tensor": torch.tensor(labels),
        "(N,)-numpy": labels,
        "(N,)-list": labels.tolist(),
        "(N,)-float": torch.tensor(labels, dtype=torch.float32),
        "(N,1)": torch.tensor(labels).view(-1, 1),
        "one-hot-tensor": nn.functional.one_hot(torch.tensor(labels), 10),
        "one-hot-numpy": np.eye(10, dtype=np.float32)[labels],
    }


@pytest.mark.parametrize("name", list(ATTACKS))
def test_label_forms_agree(name: str, tiny_model: Factory) -> None:
    model, x = tiny_model("cnn"), batch(3)
    results = {form: ATTACKS[name](model, x, y, **QUICK) for form, y in label_forms().items()}
    reference = results.pop("(N,)-tensor")
    for form, result in results.items():
        assert torch.equal(result.x_adv, reference.x_adv), form
        assert torch.equal(result.success, reference.success), form
    assert torch.equal(reference.original_class, torch.tensor([3, 7, 1]))


NUMPY_PARAMS = {
    "eps": (np.float32(0.0625), 0.0625),
    "n_batch-count": (np.int64(5), 5),
    "n_batch-fraction": (np.float32(0.25), 0.25),
    "max_iter": (np.int32(3), 3),
    "momentum": (np.float64(0.5), 0.5),
}


@pytest.mark.parametrize("param", list(NUMPY_PARAMS))
def test_numpy_scalar_parameters_act_as_python_numbers(param: str, tiny_model: Factory) -> None:
    """np.float32(0.0625) is the eps 0.0625; a numpy float n_batch stays a fraction, a numpy int a count."""
    model, x = tiny_model("cnn"), batch(3)
    numpy_value, python_value = NUMPY_PARAMS[param]
    name = param.split("-")[0]
    given = lrp_grad(model, x, **{"max_iter": 3, name: numpy_value})
    expected = lrp_grad(model, x, **{"max_iter": 3, name: python_value})
    assert torch.equal(given.x_adv, expected.x_adv)
    assert torch.equal(given.iterations, expected.iterations)


@pytest.mark.parametrize(
    ("param", "value"),
    [("eps", np.bool_(True)), ("n_batch", np.bool_(True)), ("max_iter", True), ("seed", True)],
    ids=["eps-np-bool", "n_batch-np-bool", "max_iter-bool", "seed-bool"],
)
def test_bools_are_not_numbers(param: str, value: Any, tiny_model: Factory) -> None:
    attack = ifgsm_noise if param == "seed" else lrp_grad
    with pytest.raises(ValueError, match=f"{param} must be"):
        attack(tiny_model("cnn"), batch(), **{param: value})


@pytest.mark.parametrize("trace", [False, True], ids=["no-trace", "trace"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_empty_batch_gives_an_empty_result(name: str, trace: bool, tiny_model: Factory) -> None:
    x = torch.zeros(0, 1, 8, 8)
    result = ATTACKS[name](tiny_model("cnn"), x, torch.zeros(0, dtype=torch.long), trace=trace, **QUICK)
    assert result.x_adv.shape == (0, 1, 8, 8)
    assert result.success.shape == result.iterations.shape == result.original_class.shape == (0,)
    assert (result.trace is not None) == trace
    if result.trace is not None:
        assert result.trace.l1.shape == result.trace.success.shape == (4, 0)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_batch_of_one(name: str, tiny_model: Factory, generator: torch.Generator) -> None:
    model, x = tiny_model("cnn"), torch.rand(3, 1, 8, 8, generator=generator)
    alone = ATTACKS[name](model, x[1:2], **QUICK)
    assert alone.x_adv.shape == (1, 1, 8, 8) and alone.success.shape == (1,)
    torch.testing.assert_close(alone.x_adv, ATTACKS[name](model, x, **QUICK).x_adv[1:2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_float64_input_gives_float64_output(name: str, tiny_model: Factory) -> None:
    x = batch().double()
    result = ATTACKS[name](tiny_model("cnn"), x, **QUICK)
    assert result.x_adv.dtype == torch.float64
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1


@pytest.mark.parametrize("name", list(ATTACKS))
def test_train_mode_model_is_attacked_in_eval_and_restored(name: str, tiny_model: Factory) -> None:
    """A Dropout model in train mode: deterministic results equal to eval mode, and train mode after."""
    model, x = tiny_model("mlp_dropout").train(), batch(4)
    params = {"max_iter": 4, "early_stop": False}
    first, second = (ATTACKS[name](model, x, **params) for _ in range(2))
    assert model.training and all(training_flags(model).values())
    assert torch.equal(first.x_adv, second.x_adv)
    model.eval()
    assert torch.equal(first.x_adv, ATTACKS[name](model, x, **params).x_adv)


def test_mixed_module_modes_are_restored_after_an_attack(tiny_model: Factory) -> None:
    """A frozen (eval) BatchNorm inside a model in train mode stays frozen."""
    model = tiny_model("cnn_bn").train()
    model[1].eval()
    flags = training_flags(model)
    lrp_grad(model, batch(), max_iter=2)
    assert training_flags(model) == flags


@pytest.mark.parametrize("name", list(ATTACKS))
def test_inplace_relu_gives_the_same_attack(name: str, tiny_model: Factory) -> None:
    x = batch(3)
    inplace = ATTACKS[name](tiny_model("cnn_inplace"), x, **QUICK)
    assert torch.equal(inplace.x_adv, ATTACKS[name](tiny_model("cnn"), x, **QUICK).x_adv)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_batchnorm_model_is_attacked_and_left_unchanged(
    name: str, tiny_model: Factory, assert_no_hooks: Callable[[nn.Module], None]
) -> None:
    model, x = tiny_model("cnn_bn"), batch(3)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    result = ATTACKS[name](model, x, max_iter=3, early_stop=False)
    assert not torch.equal(result.x_adv, x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert_no_hooks(model)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_callers_tensors_and_model_unchanged_by_an_attack(
    name: str, digits_cnn: nn.Module, digits_correct: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = digits_correct[0][:8], digits_correct[1][:8]
    x_before, y_before = x.clone(), y.clone()
    weights = {key: value.clone() for key, value in digits_cnn.state_dict().items()}
    result = ATTACKS[name](digits_cnn, x, y, max_iter=5)
    assert result.x_adv.data_ptr() != x.data_ptr()
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert all(torch.equal(value, weights[key]) for key, value in digits_cnn.state_dict().items())


# ---------------------------------------------------------------- the check functions themselves


def test_check_inputs_returns_the_callers_tensor_untouched() -> None:
    x = batch()
    assert check_inputs(x, (0, 1)) is x


def test_check_inputs_tolerates_rounding_at_the_bounds() -> None:
    x = batch()
    x[0, 0, 0, 0] = 1 + 1e-7
    assert check_inputs(x, (0.0, 1.0)) is x
    x[0, 0, 0, 0] = 1 + 1e-5
    with pytest.raises(ValueError, match="outside the bounds"):
        check_inputs(x, (0.0, 1.0))


@pytest.mark.parametrize(
    "bounds",
    [(0.0,), (0.0, float("nan")), (1.0, 1.0), (0.0, 1.0, 2.0), None],
    ids=["one", "nan", "equal", "three", "none"],
)
def test_check_bounds_refuses_malformed_bounds(bounds: Any) -> None:
    with pytest.raises(ValueError, match="bounds must be"):
        check_bounds(bounds)


def test_check_labels_names_the_argument() -> None:
    with pytest.raises(ValueError, match="target must hold class indices"):
        check_labels([0, 12], 2, 10, torch.device("cpu"), name="target")


@pytest.mark.parametrize("form", list(label_forms()))
def test_check_labels_reads_every_form(form: str) -> None:
    labels = check_labels(label_forms()[form], 3, 10, torch.device("cpu"))
    assert labels.dtype == torch.long
    assert torch.equal(labels, torch.tensor([3, 7, 1]))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float64], ids=lambda d: np.dtype(d).name)
def test_check_labels_reads_numpy_dtypes(dtype: type, rng: np.random.Generator) -> None:
    labels = rng.integers(0, 10, size=20)
    read = check_labels(labels.astype(dtype), 20, 10, torch.device("cpu"))
    assert torch.equal(read, torch.from_numpy(labels).long())
