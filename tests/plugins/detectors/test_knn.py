"""KNNScore (Carrara et al. 2017, seeds/003 eq. 2): exact chunked search against a float64 numpy oracle,
ties and exact matches, each weighting on hand-made examples, preprocessing, invariance to batching, the
detection AUC against ART's FGSM on the digits CNN, and bad input refused before any work."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from fractions import Fraction

import faiss
import numpy as np
import pytest
import torch
from art.attacks.evasion import FastGradientMethod
from art.estimators.classification import PyTorchClassifier
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from torch import nn

from xaiadv.plugins.detectors.knn import BACKENDS, KNNScore


def vector_model(dim: int, classes: int = 3, *, favour: int | None = None) -> nn.Module:
    """Features = the input itself (layer "0"); logits from a Linear, constant ``favour`` class if given."""
    linear = nn.Linear(dim, classes)
    if favour is not None:
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
            linear.bias[favour] = 1.0
    return nn.Sequential(nn.Identity(), linear).eval()


def fitted_on(references: np.ndarray | torch.Tensor, labels: object = None, **params: object) -> KNNScore:
    """A KNNScore whose reference features are exactly ``references`` (N, D) (no preprocess)."""
    references = torch.as_tensor(references, dtype=torch.float32)
    labels = torch.zeros(len(references), dtype=torch.long) if labels is None else labels
    model = vector_model(references.shape[1], params.pop("classes", 3), favour=params.pop("favour", None))
    params = {"preprocess": None, "k": 3, **params}
    return KNNScore(model, layer="0", **params).fit(references, labels)


def brute_force(queries: np.ndarray, references: np.ndarray, k: int, *, exclude_self: bool = False):
    """Float64 oracle: (distances, indices) ordered by (distance, index)."""
    queries, references = queries.astype(np.float64), references.astype(np.float64)
    squared = ((queries[:, None, :] - references[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(squared, np.inf)
    index = np.broadcast_to(np.arange(references.shape[0]), squared.shape)
    order = np.stack([np.lexsort((index[row], squared[row]))[:k] for row in range(len(squared))])
    return np.sqrt(np.take_along_axis(squared, order, 1)), order


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


# ----------------------------------------------------------------------------------------------------
# search


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 5])
def test_chunked_search_equals_float64_brute_force(
    rng: np.random.Generator, chunk_size: int, k: int, backend: str
) -> None:
    references = rng.normal(size=(300, 6)).astype(np.float32)
    queries = rng.normal(size=(40, 6)).astype(np.float32)
    detector = fitted_on(references, k=k, chunk_size=chunk_size, backend=backend)
    distances, indices = detector.neighbours(torch.from_numpy(queries))
    expected_distances, expected_indices = brute_force(queries, references, k)
    assert distances.dtype == torch.float32 and distances.shape == (40, k)
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_matches_have_distance_zero_and_come_first(rng: np.random.Generator, backend: str) -> None:
    # A large common offset: |q|^2 + |r|^2 - 2 q.r in float32 loses everything below ~1e-1 here.
    references = (1000.0 + 0.01 * rng.normal(size=(200, 8))).astype(np.float32)
    queries = references[[5, 70, 199]]
    detector = fitted_on(references, k=4, chunk_size=2, backend=backend)
    distances, indices = detector.neighbours(torch.from_numpy(queries))
    assert distances[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert indices[:, 0].tolist() == [5, 70, 199]
    expected_distances, expected_indices = brute_force(queries, references, 4)
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_reference_index(rng: np.random.Generator, backend: str) -> None:
    references = (5.0 + rng.normal(size=(500, 4))).astype(np.float32)  # nothing near the origin
    # more tied copies than the float32 pass keeps as candidates (2k + 16): the exhaustive re-search decides
    copies = np.sort(rng.choice(np.arange(5, 500), size=60, replace=False))
    references[copies] = references[copies[-1]]
    references[3] = [1.0, 0.0, 0.0, 0.0]  # equidistant from the origin, not equal
    references[1] = [-1.0, 0.0, 0.0, 0.0]
    queries = torch.from_numpy(np.stack([references[copies[0]], np.zeros(4, np.float32)]))
    distances, indices = fitted_on(references, k=5, chunk_size=1, backend=backend).neighbours(queries)
    assert indices[0].tolist() == copies[:5].tolist()
    assert distances[0].tolist() == [0.0] * 5
    assert indices[1, :2].tolist() == [1, 3]
    assert distances[1, :2].tolist() == [1.0, 1.0]
    again = fitted_on(references, k=5, chunk_size=64, backend=backend).neighbours(queries)[1]  # any chunking
    assert torch.equal(again, indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leave_one_out_drops_only_the_point_itself(rng: np.random.Generator, backend: str) -> None:
    references = rng.normal(size=(120, 5)).astype(np.float32)
    references[40] = references[10]  # a duplicate of another point is still found, at distance 0
    detector = fitted_on(references, k=3, chunk_size=16, backend=backend)
    distances, indices = detector.neighbours(detector.reference_features_, exclude_self=True)
    assert not bool((indices == torch.arange(120)[:, None]).any())
    assert indices[10, 0] == 40 and indices[40, 0] == 10 and distances[10, 0] == 0
    expected_distances, expected_indices = brute_force(references, references, 3, exclude_self=True)
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=1e-6)
    # without exclusion, every point is its own nearest neighbour (10 and 40: the lower index of the pair)
    own = detector.neighbours(detector.reference_features_)[1][:, 0]
    expected_own = torch.arange(120)
    expected_own[40] = 10
    assert torch.equal(own, expected_own)


# ----------------------------------------------------------------------------------------------------
# the references scored leave-one-out; the faiss backend


def loo_scores_oracle(
    references: np.ndarray, labels: np.ndarray, predictions: np.ndarray, k: int, weighting: str
) -> np.ndarray:
    """Float64 oracle of eq. 2's ``1 - s(r_i, f(r_i))`` over the k nearest references other than i."""
    distances, order = brute_force(references, references, k, exclude_self=True)
    if weighting == "uniform":
        weights = np.ones_like(distances)
    elif weighting == "rank":
        weights = np.broadcast_to(1.0 / np.arange(1, k + 1), distances.shape)
    else:  # 1/d^2; a row with an exact match: all the weight on its zero-distance neighbours
        with np.errstate(divide="ignore"):
            inverse = 1.0 / distances**2
        weights = np.where(distances[:, :1] == 0, (distances == 0).astype(float), inverse)
    agree = labels[order] == predictions[:, None]
    return 1.0 - (weights * agree).sum(1) / weights.sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["uniform", "rank", "distance"])
@pytest.mark.parametrize("k", [1, 4])
def test_reference_scores_leave_one_out_equal_the_oracle(
    rng: np.random.Generator, k: int, weighting: str, backend: str
) -> None:
    references = rng.normal(size=(150, 4)).astype(np.float32)
    references[[40, 41]] = references[10]  # three copies of one point, with different labels
    labels = rng.integers(0, 3, size=150)
    labels[[10, 40, 41]] = [0, 1, 2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(references)).argmax(1).numpy()
    assert len(np.unique(predictions)) == 3
    detector = KNNScore(
        model, layer="0", preprocess=None, k=k, weighting=weighting, chunk_size=32, backend=backend
    ).fit(torch.from_numpy(references), torch.from_numpy(labels))
    assert torch.equal(detector.reference_predictions_, torch.from_numpy(predictions))
    scores = detector.score_references()
    expected = loo_scores_oracle(references, labels, predictions, k, weighting)
    assert scores.dtype == torch.float64 and scores.shape == (150,)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-6)
    if k == 1:  # point 10's one neighbour is its first copy, 40 (label 1), not itself (label 0)
        assert float(scores[10]) == float(labels[40] != predictions[10])
    # scored with itself among the references, every point would be its own neighbour
    assert not torch.allclose(scores, detector.score(torch.from_numpy(references)))


@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_faiss_backend_equals_torch_and_brute_force(
    rng: np.random.Generator, k: int, chunk_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    indexes = []  # proof that the faiss backend searches with faiss
    factory = faiss.index_factory
    monkeypatch.setattr(
        faiss,
        "index_factory",
        lambda dim, key, metric: indexes.append((dim, key)) or factory(dim, key, metric),
    )
    references = rng.normal(size=(400, 8)).astype(np.float32)  # continuous: no ties
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    labels = torch.from_numpy(rng.integers(0, 3, size=400))
    model = vector_model(8)  # one model for both: the same predicted classes
    params = {"layer": "0", "preprocess": None, "k": k, "chunk_size": chunk_size, "weighting": "distance"}
    by_torch = KNNScore(model, backend="torch", **params).fit(torch.from_numpy(references), labels)
    by_faiss = KNNScore(model, backend="faiss", **params).fit(torch.from_numpy(references), labels)
    assert "backend='faiss'" in repr(by_faiss)
    for exclude_self, points in ((False, queries), (True, references)):
        distances, indices = by_faiss.neighbours(torch.from_numpy(points), exclude_self=exclude_self)
        expected_distances, expected_indices = brute_force(points, references, k, exclude_self=exclude_self)
        np.testing.assert_array_equal(indices.numpy(), expected_indices)
        np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=1e-6)
        torch_distances, torch_indices = by_torch.neighbours(
            torch.from_numpy(points), exclude_self=exclude_self
        )
        assert torch.equal(indices, torch_indices) and torch.equal(distances, torch_distances)
    query = torch.from_numpy(queries)
    assert torch.equal(by_faiss.class_scores(query), by_torch.class_scores(query))
    assert torch.equal(by_faiss.score(query), by_torch.score(query))
    assert torch.equal(by_faiss.score_references(), by_torch.score_references())
    assert indexes and set(indexes) == {(8, "Flat")}
    assert isinstance(by_faiss.index_, faiss.IndexFlat) and by_faiss.index_.ntotal == 400


def test_faiss_backend_on_digits_features(digits, digits_cnn: nn.Module) -> None:
    x, y = digits.x_train, digits.y_train
    by_torch = KNNScore(digits_cnn, preprocess="pca", n_components=8, weighting="rank").fit(x, y)
    by_faiss = KNNScore(digits_cnn, preprocess="pca", n_components=8, weighting="rank", backend="faiss").fit(
        x, y
    )
    assert torch.equal(by_faiss.score(digits.x_test), by_torch.score(digits.x_test))
    assert torch.equal(by_faiss.score_references(), by_torch.score_references())


def test_faiss_backend_without_faiss_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(
        ImportError, match=r"backend='faiss' needs the faiss package: pip install 'xaiadv\[faiss\]'"
    ):
        KNNScore(vector_model(4), layer="0", backend="faiss")
    assert KNNScore(vector_model(4), layer="0").backend == "torch"


def test_reference_scores_need_a_fit_and_k_below_the_reference_count() -> None:
    detector = KNNScore(vector_model(2), layer="0", k=3, preprocess=None)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        detector.score_references()
    detector.fit(torch.rand(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="k=3 must be <= 2"):
        detector.score_references()


# ----------------------------------------------------------------------------------------------------
# eq. 2 on hand-made examples

# 1-D references at 1, 2, 4, 7, 11 with classes 0, 1, 1, 0, 2; the query at 0 with k=4 sees
# neighbours at distances 1, 2, 4, 7 with classes 0, 1, 1, 0.
POSITIONS = [[1.0], [2.0], [4.0], [7.0], [11.0]]
CLASSES = torch.tensor([0, 1, 1, 0, 2])


def hand_score(weights: list[Fraction]) -> list[float]:
    total = sum(weights)
    s0 = (weights[0] + weights[3]) / total
    s1 = (weights[1] + weights[2]) / total
    return [float(s0), float(s1), 0.0]


HAND = {
    "uniform": hand_score([Fraction(1)] * 4),  # 1/2, 1/2, 0
    "rank": hand_score([Fraction(1, i) for i in (1, 2, 3, 4)]),  # 3/5, 2/5, 0
    "distance": hand_score([Fraction(1, d * d) for d in (1, 2, 4, 7)]),
}


@pytest.mark.parametrize("weighting", list(HAND))
def test_each_weighting_matches_eq2_by_hand(weighting: str) -> None:
    detector = fitted_on(POSITIONS, CLASSES, k=4, weighting=weighting, favour=1)
    query = torch.zeros(1, 1)
    torch.testing.assert_close(detector.class_scores(query), torch.tensor([HAND[weighting]]))
    # the model predicts class 1: score = 1 - s(q, 1)
    torch.testing.assert_close(detector.score(query).float(), torch.tensor([1.0 - HAND[weighting][1]]))
    assert HAND["rank"] == pytest.approx([0.6, 0.4, 0.0])


def test_distance_weighting_with_exact_matches_is_finite() -> None:
    # Two references exactly at the query (classes 1 and 0) share all the weight; the one at 5 gets none.
    detector = fitted_on([[2.0], [2.0], [5.0]], torch.tensor([1, 0, 1]), k=3, weighting="distance", favour=1)
    scores = detector.class_scores(torch.tensor([[2.0], [5.0], [3.0]]))
    assert bool(torch.isfinite(scores).all())
    torch.testing.assert_close(scores[0], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(scores[1], torch.tensor([0.0, 1.0, 0.0]))  # one exact match: all its weight
    torch.testing.assert_close(scores[2], torch.tensor([1 / 2.25, 1.25 / 2.25, 0.0]))  # 1, 1, 1/4
    torch.testing.assert_close(
        detector.score(torch.tensor([[2.0]])), torch.tensor([0.5], dtype=torch.float64)
    )


def test_class_absent_from_fitting_data_scores_zero() -> None:
    detector = fitted_on(POSITIONS, CLASSES, k=2, classes=4, favour=3)
    assert detector.n_classes_ == 4
    scores = detector.class_scores(torch.tensor([[0.0], [10.0]]))
    assert scores[:, 3].tolist() == [0.0, 0.0]
    assert detector.score(torch.tensor([[0.0]])).tolist() == [1.0]


# ----------------------------------------------------------------------------------------------------
# deep features and preprocessing on the digits CNN


def test_l2_features_are_the_normalized_pooled_last_conv(digits, digits_cnn: nn.Module) -> None:
    detector = KNNScore(digits_cnn, preprocess="l2").fit(digits.x_train[:200], digits.y_train[:200])
    assert detector.layer_ == "3"  # the last Conv2d
    x = digits.x_test[:20]
    with torch.no_grad():
        pooled = digits_cnn[:4](x).mean(dim=(2, 3))
    features = detector.features(x)
    torch.testing.assert_close(features, pooled / pooled.norm(dim=1, keepdim=True))
    torch.testing.assert_close(features.norm(dim=1), torch.ones(20))


def test_preprocessing_normalizes_before_the_model(digits, digits_cnn: nn.Module) -> None:
    x = digits.x_test[:10]
    detector = KNNScore(digits_cnn, preprocess=None, preprocessing=(0.5, 0.25))
    detector.fit(digits.x_train[:50], digits.y_train[:50])
    with torch.no_grad():
        expected = digits_cnn[:4]((x - 0.5) / 0.25).mean(dim=(2, 3))
    torch.testing.assert_close(detector.features(x), expected)


def test_pca_whitening_gives_identity_covariance(digits, digits_cnn: nn.Module) -> None:
    x, y = digits.x_train[:600], digits.y_train[:600]
    detector = KNNScore(digits_cnn, preprocess="pca", n_components=8).fit(x, y)
    whitened = detector.reference_features_.double()
    assert whitened.shape == (600, 8)
    torch.testing.assert_close(whitened.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cov(whitened.T), torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=0)
    # scikit-learn's PCA(whiten=True) gives the same features, up to the sign of each component
    plain = KNNScore(digits_cnn, preprocess=None).fit(x, y)
    raw = plain.reference_features_.double().numpy()
    expected = PCA(n_components=8, whiten=True, svd_solver="full").fit(raw)
    queries = digits.x_test[:30]
    expected_queries = expected.transform(plain.features(queries).double().numpy())
    actual_queries = detector.features(queries).numpy()
    np.testing.assert_allclose(np.abs(actual_queries), np.abs(expected_queries), atol=1e-4)
    np.testing.assert_allclose(np.abs(whitened.numpy()), np.abs(expected.transform(raw)), atol=1e-4)


def test_readme_example_fits_features_narrower_than_256(digits, digits_cnn: nn.Module) -> None:
    """The README's line on the digits CNN (16 features): it raised ``n_components=256 must be <= ...``."""
    x_train, y_train = digits.x_train[:400], digits.y_train[:400]
    detector = KNNScore(digits_cnn, k=10, weighting="rank", preprocess="pca").fit(x_train, y_train)
    assert detector.n_components is None and detector.n_components_ == 16  # min(256, 16 wide, 400, rank 16)
    assert detector.pca_projection_.shape == (16, 16) and detector.reference_features_.shape == (400, 16)
    scores = detector.score(digits.x_test[:20])
    assert scores.shape == (20,) and bool(((scores >= 0) & (scores <= 1)).all())
    # the same width asked for explicitly: the same fit
    explicit = KNNScore(digits_cnn, k=10, weighting="rank", preprocess="pca", n_components=16)
    assert torch.equal(explicit.fit(x_train, y_train).reference_features_, detector.reference_features_)


def test_default_pca_width_is_limited_by_fit_samples_and_rank(rng: np.random.Generator) -> None:
    """n_components=None: 40-wide features of 12 samples span 11 centered directions; 5 independent
    columns repeated 8 times span 5. Whitening a zero-variance direction would divide by zero."""
    references = rng.normal(size=(12, 40)).astype(np.float32)
    model = vector_model(40)
    detector = KNNScore(model, layer="0", preprocess="pca", k=3).fit(
        torch.from_numpy(references), torch.zeros(12)
    )
    assert detector.n_components_ == 11
    whitened = detector.reference_features_.double()
    torch.testing.assert_close(torch.cov(whitened.T), torch.eye(11, dtype=torch.float64), atol=1e-4, rtol=0)
    narrow = KNNScore(model, layer="0", preprocess="pca", k=3).fit(
        torch.from_numpy(references[:, :5]).repeat(1, 8), torch.zeros(12)
    )
    assert narrow.n_components_ == 5  # 40 columns, 5 of them independent
    with pytest.raises(ValueError, match="n_components=12 exceeds the rank 11"):
        KNNScore(model, layer="0", preprocess="pca", k=3, n_components=12).fit(
            torch.from_numpy(references), torch.zeros(12)
        )
    constant = torch.ones(12, 40)
    with pytest.raises(
        ValueError, match="reference features are constant: preprocess='pca' has no direction"
    ):
        KNNScore(model, layer="0", preprocess="pca", k=3).fit(constant, torch.zeros(12))


def test_score_and_distance_is_the_score_and_the_mean_neighbour_distance(digits, digits_cnn) -> None:
    detector = KNNScore(digits_cnn, k=5).fit(digits.x_train[:300], digits.y_train[:300])
    x = torch.cat([digits.x_test[:40], digits.x_train[:3]])
    score, distance = detector.score_and_distance(x)
    assert torch.equal(score, detector.score(x))
    assert distance.dtype == torch.float64 and distance.shape == (43,)
    neighbour_distances, _ = detector.neighbours(detector.features(x))
    torch.testing.assert_close(distance, neighbour_distances.double().mean(1), rtol=1e-6, atol=1e-7)
    assert bool((distance[:40] > 0).all())  # a training image has itself among its neighbours: smaller
    assert detector.score_and_distance(x[:0])[1].shape == (0,)


def test_scores_do_not_depend_on_batching_or_order(digits, digits_cnn: nn.Module) -> None:
    x = torch.cat([digits.x_test[:60], digits.x_train[:5]])  # includes exact matches of references
    params = {"k": 7, "weighting": "distance"}
    reference = KNNScore(digits_cnn, **params).fit(digits.x_train, digits.y_train)
    rebatched = KNNScore(digits_cnn, batch_size=7, chunk_size=5, **params).fit(digits.x_train, digits.y_train)
    expected = reference.score(x)
    torch.testing.assert_close(rebatched.score(x), expected, atol=1e-6, rtol=0)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(reference.score(x[order]), expected[order], atol=1e-6, rtol=0)
    one = torch.stack([reference.score(x[i : i + 1])[0] for i in (0, 30, 64)])
    torch.testing.assert_close(one, expected[[0, 30, 64]], atol=1e-6, rtol=0)
    assert reference.score(x[:0]).shape == (0,)
    assert reference.class_scores(x[:0]).shape == (0, 10)
    assert reference.features(x[:0]).shape == (0, 16)
    empty_distances, empty_indices = reference.neighbours(torch.empty(0, 16))
    assert empty_distances.shape == empty_indices.shape == (0, 7)
    # a reference image is its own nearest neighbour: DW-kNN puts all the weight on it
    torch.testing.assert_close(reference.score(x[60:]), torch.zeros(5, dtype=torch.float64))


# Measured (eps=0.15, k=10, 80 successful FGSM examples of the first 100 correctly classified test
# images vs those 100 clean images): ROC AUC per (preprocess, weighting).
MEASURED_AUC = {
    (None, "uniform"): 0.894, (None, "rank"): 0.916, (None, "distance"): 0.912,
    ("l2", "uniform"): 0.871, ("l2", "rank"): 0.894, ("l2", "distance"): 0.894,
    ("pca", "uniform"): 0.928, ("pca", "rank"): 0.937, ("pca", "distance"): 0.936,
}  # fmt: skip


@pytest.fixture(scope="module")
def fgsm_examples(digits_cnn: nn.Module, digits_correct) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, adversarial): correctly classified test images and their successful FGSM versions (ART)."""
    x, y = digits_correct
    classifier = PyTorchClassifier(
        copy.deepcopy(digits_cnn), loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
        clip_values=(0.0, 1.0),
    )  # fmt: skip
    adversarial = torch.from_numpy(FastGradientMethod(classifier, eps=0.15).generate(x.numpy())).float()
    with torch.no_grad():
        fooled = digits_cnn(adversarial).argmax(1) != y
    assert int(fooled.sum()) >= 50
    return x, adversarial[fooled]


@pytest.mark.parametrize(("preprocess", "weighting"), list(MEASURED_AUC))
def test_detects_fgsm_on_digits(digits, digits_cnn, fgsm_examples, preprocess, weighting) -> None:
    clean, adversarial = fgsm_examples
    detector = KNNScore(digits_cnn, k=10, weighting=weighting, preprocess=preprocess, n_components=16)
    detector.fit(digits.x_train, digits.y_train)
    scores = torch.cat([detector.score(clean), detector.score(adversarial)]).numpy()
    truth = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    assert roc_auc_score(truth, scores) > MEASURED_AUC[(preprocess, weighting)] - 0.03


# ----------------------------------------------------------------------------------------------------
# bad input, invariants


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


CONSTRUCTOR_ERRORS: dict[str, tuple[dict[str, object], str]] = {
    "weighting": ({"weighting": "gaussian"}, "weighting must be one of 'uniform', 'rank', 'distance'"),
    "preprocess": ({"preprocess": "zca"}, "preprocess must be one of None, 'l2', 'pca'"),
    "k zero": ({"k": 0}, "k must be an int > 0"),
    "k float": ({"k": 2.0}, "k must be an int > 0"),
    "chunk_size": ({"chunk_size": -1}, "chunk_size must be an int > 0"),
    "backend": ({"backend": "annoy"}, "backend must be one of 'torch', 'faiss'; got 'annoy'"),
    "layer": ({"layer": "conv9"}, r"layer\(s\) \['conv9'\] not in the model; its layers are: inner, inner.0"),
    "preprocessing": ({"preprocessing": (0.5,)}, r"preprocessing must be None or a pair \(mean, std\)"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR_ERRORS))
def test_bad_configuration_is_refused(
    digits_cnn: nn.Module, case: str, counting_model: type[nn.Module]
) -> None:
    params, message = CONSTRUCTOR_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        KNNScore(counting_model(digits_cnn), **params)


@pytest.mark.parametrize("n_components", [0, -3, 2.0, True, "16"])
def test_n_components_must_be_a_positive_int_or_none(digits_cnn: nn.Module, n_components: object) -> None:
    with pytest.raises(ValueError, match="n_components must be an int > 0"):
        KNNScore(digits_cnn, preprocess="pca", n_components=n_components)


def test_default_layer_needs_a_conv() -> None:
    with pytest.raises(ValueError, match=r"layer=None picks the last Conv2d.*pass layer="):
        KNNScore(vector_model(4))


FIT_ERRORS: dict[str, tuple[Callable, type[Exception], str]] = {
    "k > references": (lambda x, y: (x[:5], y[:5]), ValueError, "x has 5 samples but k=10"),
    "nan": (lambda x, y: (with_nan(x), y), ValueError, "x contains NaN"),
    "integer x": (lambda x, y: ((x * 16).long(), y), TypeError, "x must be a floating-point tensor"),
    "label range": (lambda x, y: (x, y + 5), ValueError, r"y must hold class indices in \[0, 9\]"),
    "label count": (lambda x, y: (x, y[:-1]), ValueError, "y must be 60 labels"),
}


@pytest.mark.parametrize("case", list(FIT_ERRORS))
def test_bad_fit_input_is_refused_before_work(
    digits, digits_cnn: nn.Module, case: str, counting_model: type[nn.Module]
) -> None:
    make, error, message = FIT_ERRORS[case]
    x, y = make(digits.x_train[:60], digits.y_train[:60])
    model = counting_model(digits_cnn)
    detector = KNNScore(model)
    x_before = x.clone()
    with pytest.raises(error, match=message):
        detector.fit(x, y)
    assert model.calls <= 1  # at most the one-sample probe for the model's output size (label checks)
    assert not hasattr(detector, "reference_features_")
    torch.testing.assert_close(x, x_before, equal_nan=True, rtol=0, atol=0)


def test_pca_components_are_checked(digits, digits_cnn: nn.Module) -> None:
    x, y = digits.x_train[:100], digits.y_train[:100]
    with pytest.raises(ValueError, match=r"n_components=17 must be <= .* min\(100, 16\).*n_components=None"):
        KNNScore(digits_cnn, preprocess="pca", n_components=17).fit(x, y)
    duplicated = x[:1].expand(20, 1, 8, 8)
    with pytest.raises(ValueError, match="n_components=2 exceeds the rank 0"):
        KNNScore(digits_cnn, preprocess="pca", n_components=2, k=2).fit(duplicated, y[:20])


def test_bad_query_input_is_refused(digits, digits_cnn: nn.Module, counting_model: type[nn.Module]) -> None:
    model = counting_model(digits_cnn)
    detector = KNNScore(model, k=3)
    with pytest.raises(NotFittedError, match=r"not fitted yet: call fit\(x, y\) first"):
        detector.score(digits.x_test[:2])
    one_hot = nn.functional.one_hot(digits.y_train[:40], 10)
    detector.fit(digits.x_train[:40], one_hot)
    assert torch.equal(detector.reference_labels_, digits.y_train[:40])
    calls = model.calls
    with pytest.raises(ValueError, match="x contains NaN"):
        detector.score(with_nan(digits.x_test[:2]))
    with pytest.raises(ValueError, match=r"x must be shaped \(N, 1, 8, 8\) as in fit"):
        detector.class_scores(digits.x_test[:2, :, :4])
    with pytest.raises(ValueError, match=r"features must be shaped \(N, 16\)"):
        detector.neighbours(torch.zeros(2, 15))
    with pytest.raises(ValueError, match="exclude_self=True needs the 40 reference features"):
        detector.neighbours(torch.zeros(2, 16), exclude_self=True)
    assert model.calls == calls


class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_model_mode_and_hooks_restored_even_after_an_error(digits, digits_cnn, assert_no_hooks) -> None:
    model = copy.deepcopy(digits_cnn).train()
    flags = training_flags(model)
    x, y = digits.x_train[:30], digits.y_train[:30]
    x_before = x.clone()
    detector = KNNScore(model, k=3).fit(x, y)
    detector.score(x)
    assert training_flags(model) == flags and model.training
    assert_no_hooks(model)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)

    broken = nn.Sequential(*list(copy.deepcopy(digits_cnn)), Exploding()).train()
    flags = training_flags(broken)
    with pytest.raises(RuntimeError, match="boom"):
        KNNScore(broken, k=3).fit(x, y)
    assert training_flags(broken) == flags
    assert_no_hooks(broken)
