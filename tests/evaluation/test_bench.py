"""Tests of xaiadv.evaluation.bench: which rows one run measures, their references and ratios, validation.

Speed itself is never asserted: only that every row was measured (seconds > 0) and relates to its
reference.
"""

from __future__ import annotations

import math

import pytest

from xaiadv.evaluation import bench
from xaiadv.evaluation.bench import BenchRow, run_bench

OURS = ["LRPFlip", "LRPMean", "LRPGrad", "LRPGradMean"]
EXPECTED = {
    "art": ["IFGSM (BasicIterativeMethod)", *OURS],
    "torchattacks": ["IFGSM (BIM)", *OURS],
    "zennit": [
        "gradient step (forward + input gradient)",
        "relevance pass, Zennit stock rules",
        "relevance pass, xaiadv fast rules",
    ],
    "xaiadv": [
        "relevance, one image at a time",
        "relevance, batched",
        "forward pass alone, batched (floor of a batched relevance pass)",
    ],
    "detector score": [
        "forward pass",
        "KNNScore.score (300 references)",
        "IDefender.score",
        "KNNScore.score, faiss backend (300 references)",  # faiss is in the `all` extra the tests install
    ],
    "detector score (gradient)": ["gradient step", "SpatialEntropy.score"],
    "detector fit": [
        "forward pass over 300 uniform noise images",
        "KNNScore.fit",
        "IDefender.fit",
        "SpatialEntropy.fit",
    ],
}
UNITS = {
    "art": "s/iteration",
    "torchattacks": "s/iteration",
    "zennit": "s/batch",
    "xaiadv": "s/image",
    "detector score": "s/256 images",
    "detector score (gradient)": "s/256 images",
    "detector fit": "s",
}


@pytest.fixture(scope="module")
def rows() -> list[BenchRow]:
    with pytest.MonkeyPatch.context() as patch:  # no Fashion-MNIST: the detectors fit on noise
        patch.setattr(bench, "load_dataset", _missing)
        return run_bench(batch_size=4, iterations=1, repeats=1, references=300)


def _missing(name: str) -> None:
    raise bench.DatasetNotFoundError(name)


def test_rows_per_library_in_order(rows: list[BenchRow]) -> None:
    assert [(row.library, row.name) for row in rows] == [
        (library, name) for library, names in EXPECTED.items() for name in names
    ]


@pytest.mark.parametrize("library", list(EXPECTED))
def test_ratios_are_to_the_first_row_of_the_library(rows: list[BenchRow], library: str) -> None:
    group = [row for row in rows if row.library == library]
    reference = group[0]
    assert reference.name == EXPECTED[library][0]
    assert reference.ratio == 1.0  # exactly: the reference divided by itself
    for row in group:
        assert row.reference == reference.name
        assert math.isfinite(row.seconds) and row.seconds > 0.0
        assert math.isfinite(row.ratio) and row.ratio > 0.0
        assert row.ratio == pytest.approx(row.seconds / reference.seconds, rel=1e-12)
        assert row.unit == UNITS[library]


def test_rows_are_frozen_values(rows: list[BenchRow]) -> None:
    with pytest.raises(AttributeError, match="cannot assign to field 'ratio'"):
        rows[0].ratio = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"batch_size": 0}, "batch_size", "0"),
        ({"iterations": 0}, "iterations", "0"),
        ({"repeats": 0}, "repeats", "0"),
        ({"batch_size": -2}, "batch_size", "-2"),
        ({"batch_size": True}, "batch_size", "True"),
        ({"iterations": False}, "iterations", "False"),
        ({"repeats": True}, "repeats", "True"),
        ({"iterations": 2.0}, "iterations", "2.0"),
        ({"repeats": "3"}, "repeats", "'3'"),
        ({"references": 0}, "references", "0"),
        ({"references": True}, "references", "True"),
    ],
)
def test_invalid_arguments_raise_before_any_work(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object], name: str, value: str
) -> None:
    def no_work(*args: object, **kw: object) -> None:
        raise AssertionError("run_bench built a model before validating its arguments")

    monkeypatch.setattr(bench, "reference_cnn", no_work)
    with pytest.raises(ValueError, match=rf"^{name} must be an int > 0; got {value}$"):
        run_bench(**kwargs)  # type: ignore[arg-type]
