"""Differentiable stand-ins for the steps of a detector that have no useful gradient.

A detector-aware attack (issue 14; Athalye et al. 2018 on obfuscated gradients) needs the gradient of the
detector's score. Two steps of our detectors are piecewise constant, so their gradient is zero almost
everywhere; each gets a surrogate that equals it in a limit:

- the kNN vote (Carrara et al. 2017, eq. 2) counts the k nearest references of a class. ``soft_knn_vote``
  weighs every candidate with ``sigmoid((tau - d_i) / T)``, tau halfway between the k-th and (k+1)-th
  distance: as the temperature T -> 0 the weights become 1 on the k nearest and 0 beyond, the vote exactly.
- the spatial entropy (Amirian et al. 2018, eq. 3) counts 8-bit values in a histogram.
  ``soft_histogram_entropy`` spreads each value over the bins with a Gaussian of width ``bandwidth``: as
  the bandwidth -> 0 every integer value falls in its own bin only, the count exactly.
  ``soft_count_entropy`` is the same limit at P**2 instead of P * 256 terms per window: each value's count of
  equal values becomes a sum of Gaussian kernels over the window's values.
"""

from __future__ import annotations

import math

import torch

from . import checks

KNN_WEIGHTINGS = ("uniform", "rank", "distance")


def soft_knn_vote(
    distances: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    *,
    k: int,
    weighting: str = "uniform",
    temperature: float = 0.1,
) -> torch.Tensor:
    """s(q, c) of eq. 2 for class ``target`` (N,), from each query's M >= k candidate references.

    distances: (N, M) Euclidean distances to the candidates, in ascending order (the nearest first);
    labels: (N, M) their classes. Weights ``w_i``: 1 (kNN), 1/i (W-kNN) or 1/d_i^2 (DW-kNN). Differentiable in
    ``distances``; the candidates' order and the ranks are taken as given.
    """
    checks.positive_int("k", k)
    checks.one_of("weighting", weighting, KNN_WEIGHTINGS)
    checks.finite_number("temperature", temperature, low=0.0, low_open=True)
    if distances.dim() != 2 or labels.shape != distances.shape or distances.shape[1] < k:
        raise ValueError(
            f"distances and labels must be (N, M) with M >= k = {k}; got {tuple(distances.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if distances.shape[1] > k:
        tau = (distances[:, k - 1] + distances[:, k]) / 2
    else:
        tau = torch.full_like(distances[:, 0], math.inf)
    inside = torch.sigmoid((tau.unsqueeze(1) - distances) / temperature)
    if weighting == "uniform":
        weights = torch.ones_like(distances)
    elif weighting == "rank":
        ranks = torch.arange(1, distances.shape[1] + 1, dtype=distances.dtype, device=distances.device)
        weights = (1.0 / ranks).expand_as(distances)
    else:
        weights = 1.0 / distances.clamp(min=torch.finfo(distances.dtype).tiny).square()
    mass = inside * weights
    same = (labels == target.view(-1, 1)).to(distances.dtype)
    return (mass * same).sum(1) / mass.sum(1)


def soft_histogram_entropy(values: torch.Tensor, *, bins: int = 256, bandwidth: float = 0.1) -> torch.Tensor:
    """Entropy (nats) of each row's histogram of ``values`` (N, P) on the integer bins 0..bins-1.

    Each value adds ``exp(-(v - b)^2 / (2 bandwidth^2))``, normalized over the bins, to bin b; integer
    values give the hard histogram's entropy as the bandwidth -> 0. Differentiable in ``values``.
    """
    checks.positive_int("bins", bins)
    checks.finite_number("bandwidth", bandwidth, low=0.0, low_open=True)
    if values.dim() != 2:
        raise ValueError(f"values must be (N, P); got {tuple(values.shape)}")
    centres = torch.arange(bins, dtype=values.dtype, device=values.device)
    logits = -((values.unsqueeze(2) - centres) ** 2) / (2 * bandwidth**2)
    spread = torch.softmax(logits, dim=2)  # each value's unit mass over the bins
    p = spread.mean(1)
    return -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum(1)


def soft_count_entropy(values: torch.Tensor, *, bandwidth: float = 1.0) -> torch.Tensor:
    """Entropy (bits) of each row of ``values`` (N, P) from soft counts of equal values.

    Eq. 3 in :func:`~xaiadv.plugins.detectors.entropy.local_spatial_entropy`'s form, S = log2(P) -
    mean_i log2(c_i), with the count c_i of values equal to v_i softened to sum_j exp(-(v_i - v_j)^2 /
    (2 bandwidth^2)): integer values give the exact entropy as the bandwidth -> 0 (c_i -> the count).
    Why not :func:`soft_histogram_entropy`: P**2 kernel terms per row instead of P * bins, 28x fewer for a
    3x3 window on 256 bins, which decides the memory of a double-backprop graph over every window.
    c_i >= 1 (the value itself), so the result is finite, in [0, log2(P)]. Differentiable in ``values``.
    """
    checks.finite_number("bandwidth", bandwidth, low=0.0, low_open=True)
    if values.dim() != 2 or values.shape[1] == 0:
        raise ValueError(f"values must be (N, P) with P >= 1; got {tuple(values.shape)}")
    gaps = values.unsqueeze(2) - values.unsqueeze(1)
    counts = torch.exp(-gaps.square() / (2 * bandwidth**2)).sum(2)
    return math.log2(values.shape[1]) - torch.log2(counts).mean(1)
