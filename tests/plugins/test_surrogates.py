"""The surrogates equal the piecewise-constant steps they replace in their limits, and pass gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from xaiadv.plugins.detectors.entropy import local_spatial_entropy
from xaiadv.plugins.surrogates import soft_count_entropy, soft_histogram_entropy, soft_knn_vote


def _hard_vote(
    d: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, k: int, weighting: str
) -> torch.Tensor:
    """Eq. 2 by brute force: the k nearest candidates' weighted share of the target class."""
    votes = []
    for row in range(len(d)):
        order = sorted(range(d.shape[1]), key=lambda i: float(d[row, i]))[:k]
        if weighting == "uniform":
            weights = [1.0] * k
        elif weighting == "rank":
            weights = [1.0 / rank for rank in range(1, k + 1)]
        else:
            weights = [1.0 / float(d[row, i]) ** 2 for i in order]
        hits = [w for w, i in zip(weights, order, strict=True) if int(labels[row, i]) == int(target[row])]
        votes.append(sum(hits) / sum(weights))
    return torch.tensor(votes, dtype=torch.float64)


@pytest.mark.parametrize("weighting", ["uniform", "rank", "distance"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_soft_vote_is_the_knn_vote_as_the_temperature_goes_to_zero(k: int, weighting: str) -> None:
    generator = torch.Generator().manual_seed(k)
    d = torch.rand(12, 9, generator=generator, dtype=torch.float64).sort(1).values + 0.05
    labels = torch.randint(0, 3, (12, 9), generator=generator)
    target = torch.randint(0, 3, (12,), generator=generator)
    expected = _hard_vote(d, labels, target, k, weighting)
    near = soft_knn_vote(d, labels, target, k=k, weighting=weighting, temperature=1e-6)
    torch.testing.assert_close(near, expected, rtol=0, atol=1e-9)
    far = soft_knn_vote(d, labels, target, k=k, weighting=weighting, temperature=10.0)
    assert not torch.allclose(far, expected)  # a warm temperature really is softer


@pytest.mark.parametrize("weighting", ["uniform", "rank", "distance"])
def test_the_soft_vote_passes_gradcheck(weighting: str) -> None:
    generator = torch.Generator().manual_seed(0)
    d = (torch.rand(4, 6, generator=generator, dtype=torch.float64).sort(1).values + 0.1).requires_grad_(True)
    labels = torch.randint(0, 2, (4, 6), generator=generator)
    target = torch.tensor([0, 1, 0, 1])

    def vote(distances: torch.Tensor) -> torch.Tensor:
        return soft_knn_vote(distances, labels, target, k=3, weighting=weighting, temperature=0.2)

    assert torch.autograd.gradcheck(vote, (d,))


def test_the_soft_histogram_entropy_is_the_counts_entropy_as_the_bandwidth_goes_to_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (5, 40), generator=generator).double()
    expected = []
    for row in values:
        counts = torch.bincount(row.long(), minlength=16).double()
        p = counts[counts > 0] / counts.sum()
        expected.append(float(-(p * p.log()).sum()))
    found = soft_histogram_entropy(values, bins=16, bandwidth=0.05)
    torch.testing.assert_close(found, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
    constant = soft_histogram_entropy(torch.full((1, 10), 3.0, dtype=torch.float64), bins=16, bandwidth=0.05)
    assert float(constant) == pytest.approx(0.0, abs=1e-9)
    spread = soft_histogram_entropy(values, bins=16, bandwidth=2.0)
    assert bool((spread > found).all())  # a wide kernel smooths the histogram: more entropy


def test_the_soft_histogram_entropy_passes_gradcheck() -> None:
    values = (torch.rand(3, 7, dtype=torch.float64) * 7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: soft_histogram_entropy(v, bins=8, bandwidth=0.5), (values,))


def test_the_soft_count_entropy_is_eq_3_as_the_bandwidth_goes_to_zero() -> None:
    """Oracle: local_spatial_entropy (itself checked against a per-patch histogram loop) on 3x3 windows."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 6, (4, 3, 3), generator=generator).double()
    expected = local_spatial_entropy(maps).flatten()
    found = soft_count_entropy(maps.flatten(1), bandwidth=0.05)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)
    constant = soft_count_entropy(torch.full((1, 9), 7.0, dtype=torch.float64), bandwidth=0.05)
    assert float(constant) == 0.0
    spread = soft_count_entropy(maps.flatten(1), bandwidth=2.0)
    assert bool((spread < found).all())  # wide kernels count neighbours as equal: less entropy
    assert bool((spread >= 0).all()) and bool((found <= math.log2(9) + 1e-12).all())


def test_the_soft_count_entropy_passes_gradcheck() -> None:
    values = torch.rand(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 5
    assert torch.autograd.gradcheck(
        lambda v: soft_count_entropy(v, bandwidth=0.7), (values.requires_grad_(True),)
    )


def test_bad_arguments_are_named() -> None:
    d, labels, target = (
        torch.rand(2, 3),
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2, dtype=torch.long),
    )
    with pytest.raises(ValueError, match=r"M >= k = 4"):
        soft_knn_vote(d, labels, target, k=4)
    with pytest.raises(
        ValueError, match=r"weighting must be one of 'uniform', 'rank', 'distance'; got 'cosine'"
    ):
        soft_knn_vote(d, labels, target, k=2, weighting="cosine")
    with pytest.raises(ValueError, match=r"temperature must be > 0; got 0.0"):
        soft_knn_vote(d, labels, target, k=2, temperature=0.0)
    with pytest.raises(ValueError, match=r"bandwidth must be > 0"):
        soft_histogram_entropy(torch.zeros(1, 2), bandwidth=-1.0)
    with pytest.raises(ValueError, match=r"bandwidth must be > 0"):
        soft_count_entropy(torch.zeros(1, 2), bandwidth=0.0)
    with pytest.raises(ValueError, match=r"values must be \(N, P\) with P >= 1; got \(1, 0\)"):
        soft_count_entropy(torch.zeros(1, 0))
    assert math.isfinite(float(soft_knn_vote(d, labels, target, k=3)[0]))  # M == k: every candidate counts
