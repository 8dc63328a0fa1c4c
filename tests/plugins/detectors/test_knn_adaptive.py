"""KNNScore.score_torch for uniform weights: the gradient reaches the predicted class's references even when
none of them is among the query's neighbours (the soft vote over the neighbourhood alone is then flat)."""

from __future__ import annotations

import torch
from torch import nn

from xaiadv.plugins.detectors import KNNScore
from xaiadv.plugins.surrogates import soft_knn_vote


def _two_clusters() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """2-d inputs that are their own features (layer "0" is the identity), class 0 around the origin and
    class 1 around (5, 5), 30 references each; the model predicts class 1 everywhere."""
    generator = torch.Generator().manual_seed(0)
    near = 0.3 * torch.randn(30, 2, generator=generator)
    references = torch.cat([near, near + 5.0])
    labels = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(30, dtype=torch.long)])
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0]))
    return nn.Sequential(nn.Identity(), head).eval(), references, labels


def test_a_query_among_the_other_class_is_pulled_toward_its_predicted_class() -> None:
    model, references, labels = _two_clusters()
    detector = KNNScore(model, layer="0", k=5, preprocess=None, temperature=1.0).fit(references, labels)
    query = torch.tensor([[0.1, -0.2]], requires_grad=True)
    score = detector.score_torch(query)
    assert float(score.detach()) == float(detector.score(query.detach())) == 1.0  # no neighbour of class 1
    (gradient,) = torch.autograd.grad(score.sum(), query)
    toward_class_one = torch.tensor([5.0, 5.0]) - query.detach()[0]
    assert float(-(gradient[0] @ toward_class_one)) > 0  # descending the score moves toward class 1


def test_the_gradient_is_the_soft_vote_over_the_neighbourhood_and_the_class_once_each() -> None:
    """Oracle: soft_knn_vote by hand over the union (each reference once) of the 2k nearest references and
    the k nearest of the predicted class, sorted by distance. Near the clusters' middle the two sets overlap,
    so counting a reference twice would change the gradient."""
    model, references, labels = _two_clusters()
    detector = KNNScore(model, layer="0", k=5, preprocess=None, temperature=0.5).fit(references, labels)
    query = torch.tensor([[2.4, 2.5]], dtype=torch.float32, requires_grad=True)
    (gradient,) = torch.autograd.grad(detector.score_torch(query).sum(), query)

    oracle_query = query.detach().double().requires_grad_(True)
    distances = torch.linalg.vector_norm(references.double() - oracle_query, dim=1)
    nearest = set(distances.detach().argsort()[:10].tolist())
    of_class = (labels == 1).nonzero()[:, 0]
    nearest |= set(of_class[distances.detach()[of_class].argsort()[:5]].tolist())
    assert len(nearest) < 15  # the sets really overlap here
    chosen = torch.tensor(sorted(nearest, key=lambda i: float(distances[i])))
    vote = soft_knn_vote(
        distances[chosen][None], labels[chosen][None], torch.tensor([1]), k=5, temperature=0.5
    )
    (expected,) = torch.autograd.grad(1.0 - vote.sum(), oracle_query)
    assert float(gradient.abs().max()) > 1e-3
    torch.testing.assert_close(gradient.double(), expected, rtol=1e-5, atol=1e-7)


def test_dw_knn_at_an_exact_match_has_a_finite_gradient() -> None:
    """A query equal to a reference: DW-kNN's weight 1/d^2 is infinite there; the surrogate floors the
    distance, so the score keeps its exact value and the gradient stays finite."""
    model, references, labels = _two_clusters()
    detector = KNNScore(model, layer="0", k=5, weighting="distance", preprocess=None).fit(references, labels)
    query = references[35:36].clone().requires_grad_(True)  # a class-1 reference itself
    score = detector.score_torch(query)
    assert torch.equal(score.detach(), detector.score(query.detach()))
    (gradient,) = torch.autograd.grad(score.sum(), query)
    assert bool(torch.isfinite(gradient).all())
