"""Classifier: one validated value for module, bounds, preprocessing, dtype and device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.model import Classifier


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).to(
        dtype
    )


MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


@pytest.mark.parametrize(
    "preprocessing",
    [
        (MEAN, STD),
        (np.asarray(MEAN), np.asarray(STD)),
        (torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)),
    ],
    ids=["lists", "arrays", "shaped"],
)
def test_normalize_equals_the_float64_oracle(preprocessing: tuple[object, object]) -> None:
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    expected = (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64
    ).view(1, 3, 1, 1)
    classifier = Classifier(_net(), (0.0, 1.0), preprocessing)
    assert torch.allclose(classifier.normalize(x), expected, rtol=0, atol=1e-6)  # float32 given: 1e-7
    assert torch.equal(Classifier(_net()).normalize(x), x)


def test_scalar_preprocessing_broadcasts_and_logits_are_the_modules_on_normalized_inputs() -> None:
    net = _net().eval()
    x = torch.rand(3, 3, 6, 6)
    classifier = Classifier(net, preprocessing=(0.5, 0.25))
    with torch.no_grad():
        assert torch.equal(classifier.logits(x), net((x - 0.5) / 0.25))


def test_inputs_are_cast_to_the_modules_dtype() -> None:
    net = _net(torch.float64).eval()
    x = torch.rand(2, 3, 6, 6)  # float32 in, a float64 module
    classifier = Classifier(net)
    assert classifier.dtype == torch.float64 and classifier.device == torch.device("cpu")
    with torch.no_grad():
        assert classifier.logits(x).dtype == torch.float64


def test_the_callers_preprocessing_values_are_copied() -> None:
    mean = np.asarray(MEAN)
    classifier = Classifier(_net(), preprocessing=(mean, STD))
    mean[:] = 0.0  # the caller reuses the array afterwards
    x = torch.ones(1, 3, 4, 4)
    assert float(classifier.normalize(x)[0, 0, 0, 0]) == pytest.approx((1 - 0.4) / 0.2)


def test_wrap_takes_a_module_or_passes_a_classifier_through() -> None:
    net = _net()
    wrapped = Classifier.wrap(net, bounds=(-1, 1))
    assert wrapped.module is net and wrapped.bounds == (-1.0, 1.0)
    assert Classifier.wrap(wrapped) is wrapped
    with pytest.raises(ValueError, match="bounds/preprocessing: a Classifier already holds them"):
        Classifier.wrap(wrapped, bounds=(0, 1))


def test_evaluating_restores_each_submodules_own_flag_even_on_error() -> None:
    net = _net().train()
    net[1].eval()  # a BatchNorm the caller froze inside a training model
    classifier = Classifier(net)
    with pytest.raises(RuntimeError, match="inside"), classifier.evaluating():
        assert not any(m.training for m in net.modules())
        raise RuntimeError("inside")
    assert net.training and net[0].training and not net[1].training


def test_a_tuple_output_is_named() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.flatten(1), x.flatten(1)

    with pytest.raises(TypeError, match=r"must return one tensor .* returned a tuple"):
        Classifier(Pair()).logits(torch.rand(1, 3, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"module": "resnet"}, TypeError, r"model must be a torch.nn.Module; got str"),
        ({"bounds": (1, 0)}, ValueError, r"bounds must be finite with low < high"),
        ({"preprocessing": 0.5}, ValueError, r"preprocessing must be None or a pair \(mean, std\)"),
        ({"preprocessing": (0.5, 0.0)}, ValueError, r"preprocessing std must be positive"),
        ({"preprocessing": (float("nan"), 1.0)}, ValueError, r"preprocessing mean must be finite"),
        ({"preprocessing": ("a", 1.0)}, ValueError, r"preprocessing mean must be a number"),
    ],
)
def test_bad_values_are_named(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    arguments = {"module": _net(), **kwargs}
    with pytest.raises(error, match=message):
        Classifier(**arguments)  # type: ignore[arg-type]


def test_a_channel_count_that_does_not_fit_the_input_is_named() -> None:
    classifier = Classifier(_net(), preprocessing=([0.1, 0.2], [1.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"preprocessing mean must be a scalar or one value per channel \(3\)"
    ):
        classifier.normalize(torch.rand(1, 3, 4, 4))


@pytest.mark.parametrize(
    ("check", "good", "bad", "message"),
    [
        (checks.positive_int, np.int64(3), True, r"k must be an int > 0; got True"),
        (checks.positive_int, 3, 0, r"k must be an int > 0; got 0"),
        (checks.natural_int, 0, -1, r"k must be an int >= 0; got -1"),
        (checks.integer, -2, 1.5, r"k must be an int; got 1.5"),
        (checks.open_fraction, 0.5, 1.0, r"k must be a number in \(0, 1\); got 1.0"),
        (checks.boolean, False, 0, r"k must be a bool; got 0"),
    ],
)
def test_parameter_checks_return_the_value_or_name_the_parameter(
    check: object, good: object, bad: object, message: str
) -> None:
    assert check("k", good) == good  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        check("k", bad)  # type: ignore[operator]


def test_finite_number_bounds() -> None:
    assert checks.finite_number("eps", 0.1, low=0.0, low_open=True) == 0.1
    with pytest.raises(ValueError, match=r"eps must be > 0; got 0.0"):
        checks.finite_number("eps", 0.0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"eps must be a finite number; got inf"):
        checks.finite_number("eps", float("inf"))
    with pytest.raises(ValueError, match=r"eps must be a finite number; got '0.1'"):
        checks.finite_number("eps", "0.1")
    with pytest.raises(ValueError, match=r"composite must be one of 'a', 'b'; got 'c'"):
        checks.one_of("composite", "c", ("a", "b"))
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['kk'\] for KNNScore; valid: \['k'\]"):
        checks.unknown_keys("KNNScore", {"kk": 1}, ["k"])
