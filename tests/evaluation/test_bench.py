"""Tests of xaiadv.evaluation.bench: which rows one run measures, their references and ratios, validation.

Speed itself is never asserted: only that every row was measured (seconds > 0) and relates to its
reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
        "LRPSignature.score",
        "KNNScore.score, faiss backend (300 references)",  # faiss is in the `all` extra the tests install
    ],
    "detector score (gradient)": ["gradient step", "SpatialEntropy.score"],
    "detector fit": [
        "forward pass over 300 uniform noise images",
        "KNNScore.fit",
        "IDefender.fit",
        "LRPSignature.fit",
        "SpatialEntropy.fit",
    ],
    "adaptive attack": [
        "IFGSM iteration",
        *(
            f"DetectorAwarePGD iteration, {name} (300 uniform noise references)"
            for name in ("IDefender", "KNNScore (uniform, BPDA)", "KNNScore (distance)", "LRPSignature")
        ),
    ],
}
ATTACK_GROUPS = ("art", "torchattacks")
UNITS = {
    "art": "s/iteration",
    "torchattacks": "s/iteration",
    "zennit": "s/batch",
    "xaiadv": "s/image",
    "detector score": "s/256 images",
    "detector score (gradient)": "s/256 images",
    "detector fit": "s",
    "adaptive attack": "s/iteration",
}


@pytest.fixture(scope="module")
def rows() -> list[BenchRow]:
    with pytest.MonkeyPatch.context() as patch:  # no Fashion-MNIST: the detectors fit on noise
        patch.setattr(bench, "load_dataset", _missing)
        return run_bench(batch_size=4, iterations=1, repeats=1, references=300, processes=2)


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
        assert row.unit == UNITS[library]
        if library in ATTACK_GROUPS:  # medians across processes: the ratio lies within its measured range
            assert row.ratio_range is not None
            assert row.ratio_range[0] <= row.ratio <= row.ratio_range[1]
        else:
            assert row.ratio_range is None
            assert row.ratio == pytest.approx(row.seconds / reference.seconds, rel=1e-12)
    if library in ATTACK_GROUPS:
        assert reference.ratio_range == (1.0, 1.0)


def _row(name: str, seconds: float, ratio: float) -> BenchRow:
    return BenchRow("art", name, seconds, "IFGSM", ratio, "s/iteration")


def test_rows_across_processes_take_the_medians_and_the_range_of_the_ratios() -> None:
    runs = [
        [_row("IFGSM", 0.10, 1.0), _row("LRPGrad", 0.18, 1.8)],
        [_row("IFGSM", 0.20, 1.0), _row("LRPGrad", 0.30, 1.5)],
        [_row("IFGSM", 0.12, 1.0), _row("LRPGrad", 0.25, 2.1)],
    ]
    reference, grad = bench._across_processes(runs)
    assert (reference.seconds, reference.ratio, reference.ratio_range) == (0.12, 1.0, (1.0, 1.0))
    assert (grad.seconds, grad.ratio, grad.ratio_range) == (0.25, 1.8, (1.5, 2.1))
    assert (grad.library, grad.name, grad.reference, grad.unit) == ("art", "LRPGrad", "IFGSM", "s/iteration")


def test_rows_across_processes_refuse_runs_that_measured_different_rows() -> None:
    with pytest.raises(ValueError, match="zip"):
        bench._across_processes([[_row("IFGSM", 0.1, 1.0)], [_row("IFGSM", 0.1, 1.0), _row("X", 0.2, 2.0)]])


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
        ({"processes": 0}, "processes", "0"),
        ({"processes": 1.5}, "processes", "1.5"),
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


# --------------------------------------------------------------------------------------------------
# kNN references at scale (issue 15): rows measured in this process, at a tiny size


@pytest.fixture(scope="module")
def knn_rows() -> list[bench.KNNScaleRow]:
    with pytest.MonkeyPatch.context() as patch:  # in this process: a fresh one costs seconds of imports
        patch.setattr(bench, "_in_fresh_process", lambda function, *args: function(*args))
        return bench.knn_scale_rows((2_000,), ivf="IVF16,Flat", nprobe=1, queries=200, repeats=1)


def test_knn_scale_rows_torch_faiss_flat_and_ivf_with_their_recall(knn_rows: list[bench.KNNScaleRow]) -> None:
    assert [(row.references, row.search) for row in knn_rows] == [
        (2_000, "torch"),
        (2_000, "faiss Flat"),
        (2_000, "faiss IVF16,Flat, nprobe 1"),
    ]
    torch_row, flat, ivf = knn_rows
    assert torch_row.recall == 1.0  # the reference itself
    assert flat.recall == 1.0  # faiss' exact index finds torch's neighbours
    assert 0.0 <= ivf.recall < 1.0  # one of 16 lists searched: some true neighbours missed
    for row in knn_rows:
        assert row.queries == 200
        assert math.isfinite(row.images_per_second) and row.images_per_second > 0.0
        assert math.isfinite(row.images_per_cpu_second) and row.images_per_cpu_second > 0.0
        assert row.load >= 0.0
        assert row.peak_mib >= row.base_mib > 0.0
        assert row.fit_seconds > 0.0


def test_recall_is_the_share_of_exact_neighbours_found() -> None:
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    found = np.array([[3, 2, 9, 8], [4, 5, 6, 7]])  # order does not matter; 2 + 4 of 8 found
    assert bench._recall(found, exact) == 0.75
    assert bench._recall(exact, exact) == 1.0


def test_synthetic_features_are_seeded_and_clustered_with_a_low_intrinsic_dimension() -> None:
    x, y = bench.synthetic_features(3_000, seed=1)
    assert x.shape == (3_000, 256) and x.dtype == torch.float32
    assert set(y.tolist()) == set(range(10))
    again, labels = bench.synthetic_features(3_000, seed=1)
    assert torch.equal(again, x) and torch.equal(labels, y)
    assert not torch.equal(bench.synthetic_features(3_000, seed=2)[0], x)
    # low intrinsic dimension: 24 latent directions carry nearly all the variance, not 256
    variances = torch.linalg.svdvals(x - x.mean(0)) ** 2
    assert float(variances[:24].sum() / variances.sum()) > 0.95
    # clustered by class: the nearest other point nearly always has the same class (uniform noise: 10%)
    distances = torch.cdist(x[:500], x[:500]).fill_diagonal_(math.inf)
    assert float((y[:500][distances.argmin(1)] == y[:500]).float().mean()) > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sizes": ()}, r"^sizes must be a non-empty tuple of ints > 0; got \(\)$"),
        ({"sizes": [2_000]}, r"^sizes must be a non-empty tuple"),
        ({"sizes": (2_000, 0)}, r"^sizes must be an int > 0; got 0$"),
        ({"nprobe": 0}, r"^nprobe must be an int > 0; got 0$"),
        ({"queries": True}, r"^queries must be an int > 0; got True$"),
        ({"repeats": 1.5}, r"^repeats must be an int > 0; got 1.5$"),
        ({"sizes": (2_000,), "ivf": "IVF4096,Flat"}, r"^ivf: index='IVF4096,Flat' has 4096 inverted lists"),
        ({"ivf": "nonsense"}, r"^ivf: index='nonsense' is not a faiss index factory string"),
        ({"ivf": "Flat"}, r"^ivf: nprobe=10 does not apply to index='Flat'"),
    ],
)
def test_knn_scale_rows_refuse_bad_arguments_before_any_row(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object], match: str
) -> None:
    def no_work(*args: object) -> None:
        raise AssertionError("a row was measured before the arguments were checked")

    monkeypatch.setattr(bench, "_in_fresh_process", no_work)
    with pytest.raises(ValueError, match=match):
        bench.knn_scale_rows(**kwargs)  # type: ignore[arg-type]
