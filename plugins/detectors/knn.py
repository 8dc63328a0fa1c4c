"""kNN score of the class the network predicts, on deep features (Carrara et al. 2017, seeds/003).

Why: an adversarial perturbation is made to fool the final classification, not the representation
inside; the training images nearest to an adversarial example in deep-feature space rarely carry the
class the network was fooled into, while those of a correctly classified clean image usually do.
Section 4, eq. 2: ``s(q, c) = sum_i w_i 1{c_i = c} / sum_i w_i`` over the k nearest training features
of the query q, with ``w_i = 1`` (kNN), ``1/i`` (W-kNN) or ``1/d(q, x_i)^2`` (DW-kNN) (Table 1); the
detector's score is ``1 - s(q, f(q))``, so that higher means more likely adversarial.

Search is exact by default, chunked over queries: a float32 pass (``|q|^2 + |r|^2 - 2 q.r``; torch, or
faiss's flat L2 index with ``backend="faiss"``) picks candidates, their distances are recomputed exactly in
float64 from the differences (so an exact duplicate is at distance exactly 0), and rows where float32
rounding could have hidden a nearer or tied reference are searched again in float64. Ties go to the lower
reference index, so both backends give the same neighbours. The distance is always Euclidean (on
``l2``-normalized features it orders neighbours as cosine similarity does), hence L2 indexes for faiss.

References at scale (issue 15): ``backend="faiss"`` takes any faiss index factory string as ``index``
(``"Flat"``, the exact search above; ``"IVF4096,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ32"`` approximate),
trained on the references at fit, with ``nprobe`` (IVF) and ``ef_search`` (HNSW). An approximate index
proposes the candidates; they are re-ranked by their exact float64 distances, so the k neighbours found are
a subset of the true candidates and their distances exact, but a true neighbour the index misses is missed
(recall@k below 1; rows where the index returns fewer than k candidates are searched exactly). The index is
saved with the detector as faiss' own serialization, a uint8 array beside the references (no pickle).

Differentiable score (issue 14): eq. 2 with uniform or rank weights is piecewise constant in x.
:meth:`KNNScore.score_torch` keeps the score's value and takes its gradient from the soft-kNN surrogate
(:func:`~xaiadv.plugins.surrogates.soft_knn_vote`) over the 2k nearest references and the k nearest of the
predicted class (the references an attack must pull the features toward): each weighted by
``sigmoid((tau - d_i) / temperature)``, tau halfway between the k-th and (k+1)-th distance, so that it
equals :meth:`KNNScore.score` as the temperature -> 0, for every weighting (DW-kNN's too: its exact
gradient vanishes whenever no neighbour has the predicted class).

Ties of the score: it takes few values (multiples of 1/k with uniform weights, exactly 1 whenever no neighbour
has the predicted class), so clean scores pile up and a threshold on the score alone can miss its target
false-positive rate by far (a 4-channel digits CNN: 11% of clean scores exactly 1, the threshold 1, nothing
flagged). The mean distance to the k neighbours (further from the fitting data: more likely adversarial) is
the detector's tie-break score: samples tied with the threshold are flagged when it is above the
tie-break threshold (:func:`~xaiadv.plugins.calibration.tie_broken_threshold_at_fpr`).
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import checks
from ..checks import check_batch, check_labels
from ..features import FeatureExtractor, check_layers, last_layer_of_type, pooled
from ..model import Classifier
from ..surrogates import soft_knn_vote
from .base import Detector, Parts

WEIGHTINGS: tuple[str, ...] = ("uniform", "rank", "distance")
PREPROCESSES: tuple[str | None, ...] = (None, "l2", "pca")
BACKENDS: tuple[str, ...] = ("torch", "faiss")
#: The faiss index factory string of the exact search, the one the torch backend does.
EXACT_INDEX = "Flat"

logger = logging.getLogger(__name__)

#: The PCA width ``n_components=None`` aims for, when the features allow that many directions.
AUTO_COMPONENTS = 256

_FLOAT32_EPS = 2.0**-23
_DISTANCE_FLOOR = 1e-12  # feature distance below which the surrogate's DW-kNN weight stops growing
_BLOCK_ELEMENTS = 2**22  # float64 elements per block of exact recomputation (32 MiB)
#: A candidate pass: (queries (n, D), m, own indices (n,) or None) -> (values (n, >=m), indices (n, >=m)).
_Candidates = Callable[[torch.Tensor, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


class KNNScore(Detector):
    """Carrara et al. 2017: kNN score of the class the network predicts, on deep features (eq. 2).

    Fitted on clean training images: their deep features (``layer``'s output, conv maps globally
    average-pooled, others flattened; default the last Conv2d) after ``preprocess`` are the references.
    ``score(x)`` (N,) is ``1 - s(x, f(x))``: higher means more likely adversarial; ``detect`` breaks the
    score's ties at the threshold by the mean neighbour distance (module docstring).

    ``weighting="distance"`` (DW-kNN, ``w_i = 1/d_i^2``) with an exact match (``d = 0``) among the k
    neighbours: the limit of eq. 2 as those distances go to 0, i.e. the zero-distance neighbours carry all
    the weight, shared equally. Memory of one search chunk: ``chunk_size * n_references`` float32 values.
    ``backend="faiss"`` searches with faiss (``pip install xaiadv[faiss]``): ``index="Flat"`` (default) gives
    the same neighbours as torch; another factory string (``"IVF4096,Flat"``, ``"HNSW32"``, ...) an
    approximate index trained on the references, searched with ``nprobe`` inverted lists (IVF indexes) or
    ``ef_search`` candidates (HNSW indexes); None leaves faiss' default (nprobe 1, efSearch 16). On a CUDA
    device with faiss' GPU build the index is searched on that GPU. ``temperature``: the soft-kNN
    surrogate's (:meth:`score_torch`, uniform and rank weights), in units of feature distance.
    ``score_references()`` scores the references themselves, each left out of its own neighbours.

    ``preprocess="pca"`` whitens the features onto ``n_components`` principal directions. ``None`` (default):
    as many as the fitting data allow, at most 256 (:data:`AUTO_COMPONENTS`): ``min(256, feature width,
    number of fit samples, numerical rank of the centered features)``. Why: a fixed 256 fails on every
    network whose features are narrower, and whitening a direction of (numerically) zero variance would
    divide by zero. An explicit int is a request: honoured exactly, or a ValueError naming ``n_components``
    when the features cannot give that many directions (never silently narrower). The width used is the
    fitted ``n_components_``.
    """

    config_names = (
        "layer",
        "k",
        "weighting",
        "preprocess",
        "n_components",
        "chunk_size",
        "backend",
        "index",
        "nprobe",
        "ef_search",
        "temperature",
    )

    def __init__(
        self,
        model: Classifier | nn.Module,
        *,
        layer: str | None = None,
        k: int = 10,
        weighting: str = "uniform",
        preprocess: str | None = "l2",
        n_components: int | None = None,
        batch_size: int = 256,
        chunk_size: int = 2048,
        backend: str = "torch",
        index: str = EXACT_INDEX,
        nprobe: int | None = None,
        ef_search: int | None = None,
        temperature: float = 0.1,
        preprocessing: object = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size, preprocessing=preprocessing)
        self.k = checks.positive_int("k", k)
        self.n_components = (
            None if n_components is None else checks.positive_int("n_components", n_components)
        )
        self.chunk_size = checks.positive_int("chunk_size", chunk_size)
        self.weighting = checks.one_of("weighting", weighting, WEIGHTINGS)
        self.preprocess = checks.one_of("preprocess", preprocess, PREPROCESSES)
        self.backend = checks.one_of("backend", backend, BACKENDS)
        if backend == "faiss":
            _faiss()  # missing faiss: the ImportError now, not at the first search
        self.index, self.nprobe, self.ef_search = _check_index(backend, index, nprobe, ef_search)
        self.temperature = checks.finite_number("temperature", temperature, low=0.0, low_open=True)
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"layer must be a layer name (str) or None; got {layer!r}")
        module = self.classifier.module
        if layer is None:
            try:
                resolved = last_layer_of_type(module, nn.Conv2d)
            except ValueError as error:
                raise ValueError(f"layer=None picks the last Conv2d, but {error}; pass layer=...") from None
        else:
            check_layers(module, [layer])
            resolved = layer
        self.layer = layer
        self._layer = resolved

    # ------------------------------------------------------------------------------------------------
    # fitting

    def _fit(self, x: torch.Tensor, y: object) -> None:
        """Extract and store the reference features of clean ``x`` (N, ...) with labels ``y`` (N,) or one-hot.

        Fitted attributes: ``layer_``, ``n_classes_`` (the model's output size), ``input_shape_``,
        ``raw_feature_dim_`` (D before preprocess), ``reference_features_`` (N, D) float32 after preprocess,
        ``reference_labels_`` (N,), ``reference_predictions_`` (N,) the model's classes for x, and for PCA
        ``n_components_`` (the width used, see the class docstring), ``pca_mean_`` (D,) and
        ``pca_projection_`` (D, n_components_) in float64; with ``backend="faiss"``, ``index_`` (the faiss
        index on the CPU, trained on and holding the references).
        """
        n = x.shape[0]
        if n < self.k:
            raise ValueError(f"x has {n} samples but k={self.k}: kNN needs at least k reference samples")
        logits, raw = self._forward(x[:1])  # one sample: the model's output size and the feature size
        n_classes, dim = logits.shape[1], raw.shape[1]
        labels = check_labels(y, n, n_classes, x.device, name="y")
        explicit = self.n_components is not None
        if self.preprocess == "pca" and explicit and self.n_components > min(n, dim):
            raise ValueError(
                f"n_components={self.n_components} must be <= min(number of samples, feature size) = "
                f"min({n}, {dim}) for preprocess='pca' (n_components=None takes as many as the data allow)"
            )
        if self.backend == "faiss" and (self.preprocess != "pca" or explicit):  # the index's checks first
            self._new_index(self.n_components if self.preprocess == "pca" else dim, n)
        logits, raw = self._forward(x)
        if self.preprocess == "pca":
            self.pca_mean_, self.pca_projection_ = _fit_whitening(raw, self.n_components)
            self.n_components_ = int(self.pca_projection_.shape[1])
        features = self._transform(raw)
        if self.backend == "faiss":
            self.index_ = self._built_index(features)
        self.layer_ = self._layer
        self.n_classes_ = n_classes
        self.raw_feature_dim_ = dim
        self.reference_labels_ = labels
        self.reference_predictions_ = logits.argmax(1)
        self.reference_features_ = features
        self.input_shape_ = tuple(x.shape[1:])
        self.__dict__.pop("_device_indexes", None)  # GPU copies of a previous fit's index

    # ------------------------------------------------------------------------------------------------
    # public queries

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled deep features of raw ``x`` after preprocess, float32 on x's device."""
        self._check_fitted()
        check_batch(x, input_shape=self.input_shape_)
        with self.classifier.evaluating():
            return self._transform(self._forward(x)[1])

    def neighbours(
        self, features: torch.Tensor, *, exclude_self: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances (N, k) ascending, float32; indices (N, k) into the references) of ``features`` (N, D).

        ``exclude_self=True``: ``features`` are the reference features themselves (row i is reference i)
        and each row's own index is left out (leave-one-out). Equal distances: lower index first.
        """
        self._check_fitted()
        features = self._check_features(features, exclude_self)
        squared, indices = self._search(features, exclude_self)
        return squared.sqrt().float(), indices

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_classes) eq. 2 score of every class among the k nearest references of raw ``x``."""
        self._check_fitted()
        check_batch(x, input_shape=self.input_shape_)
        with self.classifier.evaluating():
            return self._class_scores(self._transform(self._forward(x)[1]))[0]

    def score_and_distance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (N,) as :meth:`score`, mean Euclidean distance (N,) float64 to the k neighbours: the
        tie-break score, see the module docstring)."""
        parts = self._scored(x)
        return parts["score"], parts["tie_break"]

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) float64 score of raw ``x`` differentiable in x, for detector-aware attacks (issue 14).

        BPDA (Athalye et al. 2018): the value is :meth:`score` exactly, the backward pass that of
        :func:`~xaiadv.plugins.surrogates.soft_knn_vote` with the detector's weighting, ``1 - s~(x, f(x))`` at
        ``temperature``, over the ``min(2k, N)`` nearest references (the search's) and the k nearest
        references of the predicted class. Why: with uniform or rank weights eq. 2 is piecewise constant in x
        (a zero gradient almost everywhere); with any weighting, an adversarial example's neighbourhood often
        holds no reference of the class it is predicted as, and eq. 2 over those neighbours is then 0 with a
        zero gradient. The predicted class's nearest references, outside the neighbourhood, are what the
        gradient pulls the features toward. (DW-kNN differentiated exactly through its k neighbours: bypass
        0.70 on the digits CNN at L-inf 0.2; through this surrogate 0.975.) The surrogate's own value equals
        the score as the temperature -> 0 except where the k-th and (k+1)-th distances are closer than the
        temperature (near-duplicate references: on digits gaps down to 2e-7), which share the k-th vote.
        """
        self._check_fitted()
        check_batch(x, input_shape=self.input_shape_)
        with self.classifier.evaluating():
            logits, raw = self._forward(x, differentiable=True)
        features = self._transform(raw)
        predicted = logits.detach().argmax(1)
        with torch.no_grad():
            count = min(2 * self.k, self.reference_features_.shape[0])
            indices = self._search(features.detach().float(), False, count)[1]
            indices, repeated = self._with_class_candidates(features.detach().float(), predicted, indices)
        difference = features[:, None, :].double() - self.reference_features_.to(x.device)[indices].double()
        labels = self.reference_labels_.to(x.device)[indices]
        # Floored: an exact match would give DW-kNN an infinite weight (its gradient at the floor is 0).
        distances = torch.linalg.vector_norm(difference, dim=-1).clamp(min=_DISTANCE_FLOOR)
        distances = torch.where(repeated, math.inf, distances)  # a candidate counted once
        order = distances.detach().sort(dim=1, stable=True).indices
        votes = soft_knn_vote(
            distances.gather(1, order),
            labels.gather(1, order),
            predicted,
            k=self.k,
            weighting=self.weighting,
            temperature=self.temperature,
        )
        with torch.no_grad():  # BPDA: the exact score forward, the surrogate's gradient backward
            classes = self._class_scores(self._transform(raw.detach()))[0]
            exact = classes.gather(1, predicted[:, None])[:, 0]
        soft = 1.0 - votes
        return (1.0 - exact).double() + (soft - soft.detach())

    def _with_class_candidates(
        self, features: torch.Tensor, classes: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``indices`` (N, M) followed by the k nearest references of each row's class in ``classes`` (N,),
        and a mask (N, M + k) of the entries that repeat an earlier one (or pad a class with fewer than k
        references), to be given an infinite distance. Exact float32 search within each class."""
        references = self.reference_features_.to(features.device)
        labels = self.reference_labels_.to(features.device)
        extra = torch.zeros(features.shape[0], self.k, dtype=torch.long, device=features.device)
        padded = torch.ones_like(extra, dtype=torch.bool)
        for label in classes.unique().tolist():
            rows = (classes == label).nonzero()[:, 0]
            members = (labels == label).nonzero()[:, 0]
            count = min(self.k, len(members))
            if count == 0:
                continue
            squared = torch.cdist(features[rows], references[members]).square()
            nearest = squared.topk(count, dim=1, largest=False).indices
            extra[rows[:, None], torch.arange(count, device=extra.device)] = members[nearest]
            padded[rows, :count] = False
        combined = torch.cat([indices, extra], 1)
        seen = (extra[:, :, None] == indices[:, None, :]).any(2) | padded
        return combined, torch.cat([torch.zeros_like(indices, dtype=torch.bool), seen], 1)

    def score_references(self) -> torch.Tensor:
        """(N,) float64 leave-one-out score of each reference: ``1 - s(r_i, f(r_i))`` among the rest (eq. 2).

        Why: clean scores of the fitting data without held-out data; scored against a set holding itself,
        a reference would always find itself at distance 0. Only the point itself is left out: an exact
        duplicate of it is still a neighbour, at distance 0. Needs k <= N - 1; no forward pass.
        """
        self._check_fitted()
        features = self._check_features(self.reference_features_, exclude_self=True)
        scores = self._class_scores(features, exclude_self=True)[0]
        predictions = self.reference_predictions_.to(features.device)
        return (1.0 - scores.gather(1, predictions[:, None])[:, 0]).double()

    # ------------------------------------------------------------------------------------------------
    # the contract's parts and state

    def _parts(self, x: torch.Tensor) -> Parts:
        """Score (eq. 2, as float64), predicted class and mean neighbour distance (the tie-break) of x."""
        logits, raw = self._forward(x)
        scores, squared = self._class_scores(self._transform(raw))
        prediction = logits.argmax(1)
        score = 1.0 - scores.gather(1, prediction[:, None])[:, 0]
        return {"score": score.double(), "class": prediction, "tie_break": squared.sqrt().mean(1)}

    def _fitted_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {
            "reference_features": self.reference_features_.cpu().numpy(),
            "reference_labels": self.reference_labels_.cpu().numpy().astype(np.int64),
            "reference_predictions": self.reference_predictions_.cpu().numpy().astype(np.int64),
        }
        if self.preprocess == "pca":
            arrays["pca_mean"] = self.pca_mean_.cpu().numpy()
            arrays["pca_projection"] = self.pca_projection_.cpu().numpy()
        if self.backend == "faiss":  # faiss' own format, as bytes: no pickle
            arrays["faiss_index"] = _faiss().serialize_index(self.index_)
        fitted = {
            "layer": self.layer_,
            "n_classes": self.n_classes_,
            "input_shape": list(self.input_shape_),
            "raw_feature_dim": self.raw_feature_dim_,
            "n_components": self.n_components_ if self.preprocess == "pca" else None,
        }
        return arrays, fitted

    def _restore(self, arrays: Mapping[str, np.ndarray], fitted: Mapping[str, Any]) -> None:
        device = self.classifier.device

        def tensor(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.array(arrays[name]), dtype=dtype).to(device)

        if fitted["layer"] != self._layer:
            raise ValueError(f"the state reads layer {fitted['layer']!r}; this configuration {self._layer!r}")
        input_shape = tuple(int(size) for size in fitted["input_shape"])
        self.n_classes_, self.raw_feature_dim_ = int(fitted["n_classes"]), int(fitted["raw_feature_dim"])
        logits, raw = self._forward(torch.zeros(1, *input_shape, device=device))
        if (logits.shape[1], raw.shape[1]) != (self.n_classes_, self.raw_feature_dim_):
            raise ValueError(
                f"the state has {self.n_classes_} classes and {self.raw_feature_dim_} features; the model "
                f"gives {logits.shape[1]} and {raw.shape[1]}: it was fitted on another model or layer"
            )
        if self.preprocess == "pca":
            self.pca_mean_ = tensor("pca_mean", torch.float64)
            self.pca_projection_ = tensor("pca_projection", torch.float64)
            self.n_components_ = int(fitted["n_components"])
            if self.pca_projection_.shape != (self.raw_feature_dim_, self.n_components_):
                raise ValueError(
                    f"n_components {self.n_components_} but a PCA projection shaped "
                    f"{tuple(self.pca_projection_.shape)}"
                )
        self.layer_ = self._layer
        self.reference_labels_ = tensor("reference_labels", torch.long)
        self.reference_predictions_ = tensor("reference_predictions", torch.long)
        self.reference_features_ = tensor("reference_features", torch.float32)
        self.input_shape_ = input_shape
        self.__dict__.pop("_device_indexes", None)
        if self.backend == "faiss":
            self.index_ = self._restored_index(arrays.get("faiss_index"))

    def _restored_index(self, serialized: np.ndarray | None) -> Any:
        """The saved faiss index, checked against the references; a state saved without one (the torch
        backend's, or older): the index built and trained on the references as :meth:`fit` does."""
        if serialized is None:
            return self._built_index(self.reference_features_)
        index = _faiss().deserialize_index(np.ascontiguousarray(serialized, dtype=np.uint8))
        n, dim = self.reference_features_.shape
        if (index.ntotal, index.d) != (n, dim):
            raise ValueError(
                f"the state's faiss index holds {index.ntotal} vectors of {index.d} dimensions; its "
                f"references are {n} of {dim}: it belongs to another fit"
            )
        self._set_search_parameters(index)
        return index

    # ------------------------------------------------------------------------------------------------
    # internals

    def _check_features(self, features: object, exclude_self: bool) -> torch.Tensor:
        dim = self.reference_features_.shape[1]
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"features must be a floating-point torch.Tensor; got {type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != dim:
            raise ValueError(f"features must be shaped (N, {dim}); got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contains NaN or Inf values")
        n_references = self.reference_features_.shape[0]
        if exclude_self:
            if features.shape[0] != n_references:
                raise ValueError(
                    f"exclude_self=True needs the {n_references} reference features themselves; "
                    f"got {features.shape[0]} rows"
                )
            if self.k > n_references - 1:
                raise ValueError(f"k={self.k} must be <= {n_references - 1} (all references but one) here")
        return features.float()

    def _forward(self, x: torch.Tensor, *, differentiable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), raw pooled features (N, D) float32) in mini-batches, one forward pass each; with
        the graph back to x when ``differentiable``."""
        if x.shape[0] == 0:
            return (
                torch.empty(0, self.n_classes_, device=x.device),
                torch.empty(0, self.raw_feature_dim_, device=x.device),
            )
        logits, features = [], []
        extractor = FeatureExtractor(self.classifier.module, [self._layer])
        with (
            extractor.capturing(detach=not differentiable) as captured,
            torch.set_grad_enabled(differentiable),
        ):
            for start in range(0, x.shape[0], self.batch_size):
                output = self.classifier.logits(x[start : start + self.batch_size])
                if self._layer not in captured:
                    raise ValueError(f"layer {self._layer!r} was not called in the model's forward pass")
                if output.dim() != 2:
                    raise ValueError("the model must return logits shaped (N, n_classes)")
                logits.append(output)
                features.append(pooled(captured.pop(self._layer)).float())
        return torch.cat(logits), torch.cat(features)

    def _transform(self, raw: torch.Tensor) -> torch.Tensor:
        if self.preprocess == "l2":
            return F.normalize(raw, dim=1)
        if self.preprocess == "pca":
            mean, projection = self.pca_mean_.to(raw.device), self.pca_projection_.to(raw.device)
            return ((raw.double() - mean) @ projection).float()
        return raw

    def _class_scores(
        self, features: torch.Tensor, exclude_self: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eq. 2 class scores (N, n_classes) float32, squared neighbour distances (N, k) float64)."""
        squared, indices = self._search(features, exclude_self)
        labels = self.reference_labels_.to(features.device)[indices]
        weights = self._weights(squared)
        scores = torch.zeros(features.shape[0], self.n_classes_, dtype=torch.float64, device=features.device)
        scores.scatter_add_(1, labels, weights)
        return (scores / weights.sum(1, keepdim=True)).float(), squared

    def _weights(self, squared: torch.Tensor) -> torch.Tensor:
        """Table 1 weights (N, k) in float64 from squared distances (N, k), ascending per row."""
        if self.weighting == "uniform":
            return torch.ones_like(squared)
        if self.weighting == "rank":
            ranks = torch.arange(1, squared.shape[1] + 1, dtype=torch.float64, device=squared.device)
            return (1.0 / ranks).expand_as(squared)
        # 1/d_i^2 scaled by the row's smallest d_1^2 (eq. 2 normalizes, and no overflow): d_1^2/d_i^2.
        # An exact match (d_1 = 0): the limit, all the weight on the zero-distance neighbours, equally.
        nearest = squared[:, :1]
        exact = nearest == 0
        ratio = nearest / torch.where(squared == 0, torch.ones_like(squared), squared)
        return torch.where(exact, (squared == 0).double(), ratio)

    def _search(
        self, queries: torch.Tensor, exclude_self: bool, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k (default ``self.k``) nearest references of ``queries`` (N, D): (squared distances float64,
        indices). Exact, or with an approximate faiss index its candidates re-ranked exactly (module
        docstring)."""
        k = self.k if k is None else k
        references = self.reference_features_.to(queries.device)
        n_references, dim = references.shape
        n = queries.shape[0]
        out_squared = torch.empty(n, k, dtype=torch.float64, device=queries.device)
        out_indices = torch.empty(n, k, dtype=torch.long, device=queries.device)
        if n == 0:
            return out_squared, out_indices
        exact_index = self.backend == "torch" or isinstance(self.index_, _faiss().IndexFlat)
        if exact_index:
            largest_norm = float((references * references).sum(1).max().sqrt())
        candidates_of = self._candidate_search(references)
        n_candidates = min(n_references, 2 * k + 16)
        for start in range(0, n, self.chunk_size):
            query = queries[start : start + self.chunk_size]
            own = start + torch.arange(query.shape[0], device=queries.device) if exclude_self else None
            candidate_values, candidates = candidates_of(query, n_candidates, own)
            missing = candidates < 0  # an approximate index found fewer than asked for
            candidates = candidates.clamp(min=0)
            exact = _exact_squared(query, references, candidates)
            exact[missing] = math.inf
            if own is not None:
                exact[candidates == own[:, None]] = math.inf
            squared, indices = _k_smallest(exact, candidates, k)
            if exact_index:
                # A reference outside the candidates is at least (largest candidate value - rounding) away.
                query_norms = (query * query).sum(1).sqrt()
                rounding = (2 * dim + 8) * _FLOAT32_EPS * (query_norms + largest_norm) ** 2
                unsure = candidate_values.max(1).values - rounding <= squared[:, -1]
                if candidates.shape[1] == n_references:
                    unsure[:] = False
            else:  # fewer than k candidates: searched exactly
                unsure = ~torch.isfinite(squared[:, -1])
            if bool(unsure.any()):  # near ties at the k-th neighbour: the same search in float64, batched
                unsure_rows = unsure.nonzero()[:, 0]
                unsure_own = None if own is None else own[unsure_rows]
                squared[unsure_rows], indices[unsure_rows], still = _float64_search(
                    query[unsure_rows], references, k, n_candidates, unsure_own
                )
                for row in unsure_rows[still].tolist():  # exact ties beyond the candidates: rare
                    own_index = start + row if exclude_self else -1
                    squared[row], indices[row] = _exhaustive(query[row], references, k, own_index)
            out_squared[start : start + query.shape[0]] = squared
            out_indices[start : start + query.shape[0]] = indices
        return out_squared, out_indices

    def _candidate_search(self, references: torch.Tensor) -> _Candidates:
        """The backend's float32 candidate pass over ``references``: (query, m, own) -> (values, indices).

        At least the m references of smallest approximate squared distance (``own`` left out or included),
        with those distances; float32 rounding is accounted for by the caller.
        """
        if self.backend == "faiss":
            index = self._device_index(references.device)

            def faiss_candidates(
                query: torch.Tensor, m: int, own: torch.Tensor | None
            ) -> tuple[torch.Tensor, ...]:
                # one more when leaving ``own`` out: it may be among them (the caller drops it)
                m = min(references.shape[0], m + (own is not None))
                values, indices = index.search(np.ascontiguousarray(query.detach().cpu().numpy()), m)
                return torch.from_numpy(values).to(query.device), torch.from_numpy(indices).to(query.device)

            return faiss_candidates
        reference_squares = (references * references).sum(1)

        def torch_candidates(
            query: torch.Tensor, m: int, own: torch.Tensor | None
        ) -> tuple[torch.Tensor, ...]:
            approximate = (
                (query @ references.T).mul_(-2).add_(reference_squares).add_((query * query).sum(1)[:, None])
            )
            if own is not None:
                approximate[torch.arange(query.shape[0], device=query.device), own] = math.inf
            return approximate.topk(m, dim=1, largest=False, sorted=False)

        return torch_candidates

    # ------------------------------------------------------------------------------------------------
    # the faiss index

    def _new_index(self, dim: int, n: int) -> Any:
        """An empty faiss index of ``self.index`` for ``dim``-wide features, with the search parameters
        set; checked (a bad factory string, more inverted lists than the ``n`` references to train them
        on, a parameter the index has not): a ValueError naming the argument."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(dim, self.index, faiss.METRIC_L2)
        except RuntimeError as error:
            raise ValueError(
                f"index={self.index!r} is not a faiss index factory string for {dim}-dimensional "
                f"features: {_faiss_reason(error)}"
            ) from None
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.nlist > n:
            raise ValueError(
                f"index={self.index!r} has {ivf.nlist} inverted lists but there are {n} references to "
                f"train them on: use fewer lists (e.g. 'IVF{max(1, n // 39)},Flat') or more references"
            )
        self._set_search_parameters(index)
        return index

    def _set_search_parameters(self, index: Any) -> None:
        space = _faiss().ParameterSpace()
        for name, faiss_name, value in (
            ("nprobe", "nprobe", self.nprobe),
            ("ef_search", "efSearch", self.ef_search),
        ):
            if value is None:
                continue
            try:
                space.set_index_parameter(index, faiss_name, value)
            except RuntimeError:
                raise ValueError(
                    f"{name}={value} does not apply to index={self.index!r} (nprobe: IVF indexes; "
                    f"ef_search: HNSW indexes)"
                ) from None

    def _built_index(self, features: torch.Tensor) -> Any:
        """The faiss index of ``features`` (N, D), trained on them (IVF's k-means seeded by faiss' fixed
        default; HNSW's graph built on one thread, so the same references give the same index)."""
        data = np.ascontiguousarray(features.detach().cpu().numpy(), dtype=np.float32)
        index = self._new_index(data.shape[1], data.shape[0])
        try:
            index.train(data)
        except RuntimeError as error:
            raise ValueError(f"index={self.index!r} could not be trained: {_faiss_reason(error)}") from None
        with _faiss_threads(1 if "HNSW" in self.index else None):
            index.add(data)
        return index

    def _device_index(self, device: torch.device) -> Any:
        """``index_`` on ``device``: a copy on that GPU when faiss has its GPU build there, kept for the
        next search; else the CPU index (faiss' GPU build takes no HNSW index, say)."""
        faiss = _faiss()
        if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return self.index_
        cache = self.__dict__.setdefault("_device_indexes", {})
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in cache:
            try:
                resources = faiss.StandardGpuResources()
                cache[key] = (resources, faiss.index_cpu_to_gpu(resources, key, self.index_))
            except RuntimeError as error:
                logger.info("faiss index %r stays on the CPU: %s", self.index, _faiss_reason(error))
                cache[key] = (None, self.index_)
        return cache[key][1]


def _float64_search(
    query: torch.Tensor, references: torch.Tensor, k: int, n_candidates: int, own: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidate search again in float64 for a few rows: (squared, indices, still unsure).

    Float64 rounding (about 1e-16 of the squared norms) leaves a row unsure only when references tie
    exactly with the k-th neighbour beyond the candidate set; those rows go to :func:`_exhaustive`.
    """
    query64, references64 = query.double(), references.double()
    squares = (references64 * references64).sum(1)
    query_squares = (query64 * query64).sum(1)
    approximate = (query64 @ references64.T).mul_(-2).add_(squares).add_(query_squares[:, None])
    rows = torch.arange(query.shape[0], device=query.device)
    if own is not None:
        approximate[rows, own] = math.inf
    candidate_values, candidates = approximate.topk(n_candidates, dim=1, largest=False, sorted=False)
    exact = _exact_squared(query, references, candidates)
    if own is not None:
        exact[candidates == own[:, None]] = math.inf
    squared, indices = _k_smallest(exact, candidates, k)
    bound = (2 * references.shape[1] + 8) * torch.finfo(torch.float64).eps
    rounding = bound * (query_squares.sqrt() + float(squares.max().sqrt())) ** 2
    still = candidate_values.max(1).values - rounding <= squared[:, -1]
    if n_candidates == references.shape[0]:
        still[:] = False
    return squared, indices, still


def _exact_squared(query: torch.Tensor, references: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Squared distances (n, m) in float64 from the differences, in blocks of queries to bound memory."""
    n, m = candidates.shape
    rows = max(1, _BLOCK_ELEMENTS // (m * references.shape[1]))
    parts = []
    for start in range(0, n, rows):
        block = candidates[start : start + rows]
        difference = query[start : start + rows, None, :].double() - references[block].double()
        parts.append((difference * difference).sum(-1))
    return torch.cat(parts)


def _k_smallest(squared: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest per row, ordered by (squared distance, index): ties go to the lower index."""
    indices, by_index = indices.sort(1)
    squared = squared.gather(1, by_index)
    order = squared.sort(dim=1, stable=True).indices[:, :k]
    return squared.gather(1, order), indices.gather(1, order)


def _exhaustive(query: torch.Tensor, references: torch.Tensor, k: int, own: int) -> tuple[torch.Tensor, ...]:
    """One query against every reference, exactly in float64, in blocks; ``own >= 0`` is left out."""
    rows = max(1, _BLOCK_ELEMENTS // references.shape[1])
    parts = []
    for start in range(0, references.shape[0], rows):
        difference = references[start : start + rows].double() - query.double()
        parts.append((difference * difference).sum(1))
    squared = torch.cat(parts)
    if own >= 0:
        squared[own] = math.inf
    order = squared.sort(stable=True).indices[:k]
    return squared[order], order


def _fit_whitening(raw: torch.Tensor, n_components: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening in float64 (as scikit-learn's ``PCA(whiten=True)``): (mean (D,), projection (D, n)).

    ``n_components=None``: n = min(AUTO_COMPONENTS, numerical rank), the rank being at most
    min(D, N - 1) for N centered samples; an int: exactly that many, or a ValueError.
    """
    data = raw.double()
    mean = data.mean(0)
    centered = data - mean
    covariance = centered.T @ centered / max(data.shape[0] - 1, 1)
    variances, vectors = torch.linalg.eigh(covariance)
    variances, vectors = variances.flip(0), vectors.flip(1)
    tolerance = float(variances[0].clamp_min(0)) * max(data.shape) * torch.finfo(torch.float64).eps
    rank = int((variances > tolerance).sum())
    if n_components is None:
        if rank == 0:
            raise ValueError("the reference features are constant: preprocess='pca' has no direction to keep")
        n_components = min(AUTO_COMPONENTS, rank)
    if rank < n_components:
        raise ValueError(
            f"n_components={n_components} exceeds the rank {rank} of the reference features "
            "(constant or dependent features): lower n_components for preprocess='pca', or pass None"
        )
    return mean, vectors[:, :n_components] / variances[:n_components].sqrt()


def _check_index(
    backend: str, index: object, nprobe: object, ef_search: object
) -> tuple[str, int | None, int | None]:
    """The faiss parameters, checked before any work (the factory string itself is parsed at fit, when
    the feature width is known)."""
    if not isinstance(index, str) or not index.strip():
        raise ValueError(
            f"index must be a faiss index factory string such as 'Flat' or 'IVF4096,Flat'; got {index!r}"
        )
    if backend != "faiss" and index != EXACT_INDEX:
        raise ValueError(
            f"index={index!r} needs backend='faiss'; backend={backend!r} searches exactly (index='Flat')"
        )
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None:
            checks.positive_int(name, value)
            if backend != "faiss":
                raise ValueError(
                    f"{name} needs backend='faiss' and an approximate index; got backend={backend!r}"
                )
    return index, nprobe, ef_search


@contextmanager
def _faiss_threads(count: int | None) -> Iterator[None]:
    """faiss' OpenMP thread count set to ``count`` (None: unchanged) for the block, restored after."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    if count is not None:
        faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _faiss_reason(error: RuntimeError) -> str:
    """The reason in a faiss C++ error message, without its source location and failed condition."""
    message = " ".join(str(error).split())
    message = re.sub(r"^Error in .*? at \S+:\d+: ", "", message)
    return re.sub(r"^Error: '.*?' failed: ", "", message)


def _faiss() -> ModuleType:
    """The faiss module, or an ImportError that names the extra providing it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as error:
        raise ImportError("backend='faiss' needs the faiss package: pip install 'xaiadv[faiss]'") from error
