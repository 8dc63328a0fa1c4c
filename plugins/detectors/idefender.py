"""I-defender (Zheng & Hong 2018, seeds/002): per-class Gaussian mixtures of a fully-connected hidden state.

Adversarial inputs that the network assigns to class c produce hidden states in low-density regions of
the hidden-state distribution of natural class-c data. One Gaussian mixture per class models that
distribution (eq. 4); an input is rejected when its log-likelihood under the mixture of its *predicted*
class falls below that class's threshold (eq. 5). Everything is float64 and in log space.

Thresholds. The paper sets them on the training data, keeping a share ``keep`` of it (ID-95: keep=0.95,
ID-99: 0.99): ``calibration="train"``. Full-covariance mixtures over-fit their own data, so those
quantiles reject far more than 1 - keep of unseen clean data. Measured on the conftest digits CNN
(224 live features of the 256-d input of its last Linear, 1300 training / 497 test images, full
covariance, keep=0.95), clean false-positive rate on the test images, used neither for fitting nor
for calibration:

    calibration="train"                            1.000  (every test image rejected)
    calibration="heldout", share 0.2, K=5, 1e-4    0.050 .. 0.097 over 5 split seeds (mean 0.072)
    calibration="heldout", share 0.3, K=5, 1e-2    0.042 .. 0.064 over 5 split seeds (mean 0.054)

Held-out thresholds are order statistics of a few clean scores per class: flagging the top m of n
gives an expected unseen rate of (m + 1) / (n + 1), so too small a calibration share biases the rate
upwards (2/27 = 7.4% with ~26 samples per class at share 0.2). The defaults (``calibration="heldout"``,
``calibration_share=0.3``, ``n_components=5``, ``reg_covar=1e-2``) are the last row; their FGSM
(eps=0.15) ROC AUC on the same model is 0.955 .. 0.982 (n_components=1 or 2 gives 0.99 there, where
each class has only ~90 fitting samples in 224 dimensions). ``"train"`` is offered for reproducing the
paper; ``calibrate(x_clean)`` re-sets the thresholds on any clean data.

Detector-aware attacks need the gradient of eq. 4 with respect to the input: ``log_likelihood(x)`` (and
``hidden``, ``score``) keep the graph back to ``x`` through the model when ``x`` requires grad.
``to_state()`` / ``from_state(...)`` give the fitted detector as arrays plus a JSON-able dict (no pickle).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

from ..calibration import per_class_thresholds
from ..checks import check_batch, check_labels
from ..features import FeatureExtractor, check_layers, last_layer_of_type, model_dtype, pooled
from ..relevance import as_preprocessing

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
CALIBRATIONS = ("heldout", "train")
_LOG_2PI = math.log(2.0 * math.pi)
#: Array name in :meth:`IDefender.to_state` -> the fitted sklearn GaussianMixture attribute it holds.
_MIXTURE_ARRAYS = {
    "weight": "weights_",
    "mean": "means_",
    "covariance": "covariances_",
    "precisions_cholesky": "precisions_cholesky_",
}
#: Constructor arguments saved by :meth:`IDefender.to_state` (model, preprocessing, batch_size: the caller's).
_CONFIG = (
    "layer",
    "n_components",
    "covariance_type",
    "reg_covar",
    "keep",
    "calibration",
    "calibration_share",
    "random_state",
)


def gmm_log_likelihood(h: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """log p(h) under a fitted sklearn ``GaussianMixture``: ``mixture.score_samples`` in differentiable torch.

    Why: detector-aware attacks need the gradient of eq. 4's log-likelihood with respect to the hidden state.
    logsumexp over components of log weight + Gaussian log density, the density written with the mixture's
    ``precisions_cholesky_`` (all four covariance types). ``h``: (N, D); returns (N,) float64 on h's device.
    """
    if not hasattr(mixture, "precisions_cholesky_"):
        raise ValueError("mixture must be a fitted sklearn GaussianMixture (no precisions_cholesky_ found)")
    return _log_likelihood(h, *_mixture_tensors(mixture, h.device), mixture.covariance_type)


def _mixture_tensors(mixture: GaussianMixture, device: torch.device) -> tuple[torch.Tensor, ...]:
    def as_tensor(value: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(value, dtype=np.float64), device=device)

    return (
        as_tensor(np.log(mixture.weights_)),
        as_tensor(mixture.means_),
        as_tensor(mixture.precisions_cholesky_),
    )


def _log_likelihood(
    h: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, precisions_chol: torch.Tensor, kind: str
) -> torch.Tensor:
    h = h.to(torch.float64)
    n_features = means.shape[1]
    if h.dim() != 2 or h.shape[1] != n_features:
        raise ValueError(f"h must be shaped (N, {n_features}); got {tuple(h.shape)}")
    diff = h[:, None, :] - means[None]  # (N, K, D)
    if kind == "full":  # precisions_chol (K, D, D)
        whitened = torch.einsum("nkd,kde->nke", diff, precisions_chol)
        log_det = torch.diagonal(precisions_chol, dim1=-2, dim2=-1).log().sum(-1)
    elif kind == "tied":  # (D, D), shared
        whitened = diff @ precisions_chol
        log_det = torch.diagonal(precisions_chol).log().sum()
    elif kind == "diag":  # (K, D)
        whitened = diff * precisions_chol[None]
        log_det = precisions_chol.log().sum(-1)
    elif kind == "spherical":  # (K,)
        whitened = diff * precisions_chol[None, :, None]
        log_det = n_features * precisions_chol.log()
    else:
        raise ValueError(f"covariance_type must be one of {', '.join(COVARIANCE_TYPES)}; got {kind!r}")
    log_prob = -0.5 * (n_features * _LOG_2PI + whitened.square().sum(-1)) + log_det + log_weights
    return torch.logsumexp(log_prob, dim=1)


class IDefender:
    """Zheng & Hong 2018: per-class Gaussian mixtures of a fully-connected layer's hidden state (eqs. 4-5).

    Hidden state: by default the *input* of the model's last ``nn.Linear`` (the last fully-connected hidden
    layer's activations); ``layer=`` names a layer whose *output* is used instead (convolutional maps are
    globally average-pooled). Features constant over the fitting data (dead units) are dropped
    (``kept_features_``); ``reg_covar`` keeps duplicate points and per-class constant features from making a
    covariance singular. ``keep`` is the share of clean samples kept per class (0.95: the paper's ID-95).
    ``calibration="heldout"`` fits the mixtures on ``1 - calibration_share`` of each class (seeded split) and
    sets the thresholds on the rest; ``"train"`` sets them on the fitting data as the paper does (see the
    module docstring for why held-out is the default). ``preprocessing=(mean, std)`` normalizes raw inputs.

    Fitted attributes: ``mixtures_`` (one sklearn GaussianMixture per class), ``kept_features_`` (bool (D,)),
    ``thresholds_`` (float64 (n_classes,), in log-likelihood), ``keep_``, ``n_classes_``, ``input_shape_``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | None = None,
        n_components: int = 5,
        covariance_type: str = "full",
        reg_covar: float = 1e-2,
        keep: float = 0.95,
        calibration: str = "heldout",
        calibration_share: float = 0.3,
        batch_size: int = 256,
        preprocessing: object = None,
        random_state: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components <= 0:
            raise ValueError(f"n_components must be an int > 0; got {n_components!r}")
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {', '.join(COVARIANCE_TYPES)}; got {covariance_type!r}"
            )
        if not _is_number(reg_covar) or not reg_covar > 0:
            raise ValueError(f"reg_covar must be a finite number > 0; got {reg_covar!r}")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}")
        if not _is_number(calibration_share) or not 0 < calibration_share < 1:
            raise ValueError(f"calibration_share must be a number in (0, 1); got {calibration_share!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be an int > 0; got {batch_size!r}")
        if isinstance(random_state, bool) or not isinstance(random_state, int):
            raise ValueError(f"random_state must be an int; got {random_state!r}")
        if preprocessing is not None and (
            not isinstance(preprocessing, (tuple, list)) or len(preprocessing) != 2
        ):
            raise ValueError(f"preprocessing must be None or a pair (mean, std); got {preprocessing!r}")
        if layer is None:
            name, capture = last_layer_of_type(model, nn.Linear), "input"
        else:
            check_layers(model, [layer])
            name, capture = layer, "output"
        self.model = model
        self.layer = layer
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        self.keep = _check_keep(keep)
        self.calibration = calibration
        self.calibration_share = float(calibration_share)
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.random_state = random_state
        self._extractor = FeatureExtractor(model, [name], capture=capture)

    def __repr__(self) -> str:
        return (
            f"IDefender(layer={self.layer!r}, n_components={self.n_components}, "
            f"covariance_type={self.covariance_type!r}, reg_covar={self.reg_covar}, keep={self.keep}, "
            f"calibration={self.calibration!r})"
        )

    # ----------------------------------------------------------------------------------------- fitting
    def fit(self, x: torch.Tensor, y: object) -> IDefender:
        """Fit one mixture per class on the hidden states of clean ``x`` (true labels ``y``), then thresholds.

        ``x``: (N, ...) raw inputs; ``y``: (N,), (N, 1) or one-hot labels. A class absent from ``x``, or with
        fewer fitting samples than ``n_components``, raises naming the class before any mixture is fitted.
        """
        x = check_batch(x).detach()
        if x.shape[0] == 0:
            raise ValueError("x is empty; fit needs clean samples of every class")
        norm = as_preprocessing(self.preprocessing, x)
        _, logits = self._forward(x[:1], norm)  # one sample: the number of classes, to check the labels
        n_classes = logits.shape[1]
        labels = check_labels(y, x.shape[0], n_classes, torch.device("cpu")).numpy()
        fit_rows, calibration_rows = self._split(labels, n_classes)

        hidden, _ = self._forward(x, norm)
        hidden = hidden.cpu().numpy()
        kept = hidden.max(0) > hidden.min(0)
        if not kept.any():
            raise ValueError("every hidden feature is constant over x: nothing for the mixtures to model")
        hidden = hidden[:, kept]
        mixtures = []
        for label in range(n_classes):  # one mixture per class: a loop over classes, not samples
            rows = fit_rows[labels[fit_rows] == label]
            mixture = GaussianMixture(
                self.n_components,
                covariance_type=self.covariance_type,
                reg_covar=self.reg_covar,
                random_state=self.random_state,
            )
            mixtures.append(mixture.fit(hidden[rows]))

        self.mixtures_ = mixtures
        self.kept_features_ = torch.as_tensor(kept)
        self.n_classes_ = n_classes
        self.input_shape_ = tuple(x.shape[1:])
        self._norm = norm
        self._params = [_mixture_tensors(mixture, torch.device("cpu")) for mixture in mixtures]
        h_cal = torch.as_tensor(hidden[calibration_rows])
        cal_labels = torch.as_tensor(labels[calibration_rows])
        self._set_thresholds(self._class_log_likelihood(h_cal, cal_labels), cal_labels, self.keep)
        return self

    def _split(self, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(fitting rows, calibration rows): all rows for both, or a seeded per-class split ("heldout")."""
        counts = np.bincount(labels, minlength=n_classes)
        absent = [label for label in range(n_classes) if counts[label] == 0]
        if absent:
            raise ValueError(f"class {absent[0]} is absent from the fitting data (absent classes: {absent})")
        everything = np.arange(labels.size)
        if self.calibration == "train":
            n_fit = counts
        else:
            n_fit = counts - np.maximum(1, np.round(self.calibration_share * counts).astype(int))
        for label in range(n_classes):
            if n_fit[label] < self.n_components:
                raise ValueError(
                    f"class {label} has {n_fit[label]} fitting samples ({counts[label]} given, calibration="
                    f"{self.calibration!r}); n_components={self.n_components} needs at least that many"
                )
        if self.calibration == "train":
            return everything, everything
        order = np.random.default_rng(self.random_state).permutation(labels.size)
        # Shuffled within each class, the classes in order; rank = position within its class.
        order = order[np.argsort(labels[order], kind="stable")]
        rank = np.arange(labels.size) - np.repeat(np.cumsum(counts) - counts, counts)
        is_fit = rank < np.repeat(n_fit, counts)
        return np.sort(order[is_fit]), np.sort(order[~is_fit])

    # ------------------------------------------------------------------------------------------ scoring
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, D) of raw inputs ``x``, dead features removed, float64 on x's device."""
        return self._hidden_and_prediction(x)[0]

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(h(x) | class c) under each class's mixture (eq. 4): (N, n_classes) float64 on x's device.

        Column c equals ``mixtures_[c].score_samples(hidden(x))``. Differentiable: when ``x`` requires grad
        (and grad mode is on) the result carries the graph back to ``x`` through the model (hooks removed
        after), for detector-aware attacks; otherwise it is computed without one.
        """
        h, _ = self._hidden_and_prediction(x)
        device = h.device
        columns = [
            _log_likelihood(h, *self._on(c, device), self.covariance_type) for c in range(self.n_classes_)
        ]
        return torch.stack(columns, dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """-log p(h(x) | predicted class): (N,) float64, higher meaning more likely adversarial."""
        return self.score_and_prediction(x)[0]

    def score_and_prediction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (N,), predicted class (N,)) from one forward pass: callers with per-class thresholds
        need both."""
        h, prediction = self._hidden_and_prediction(x)
        return -self._class_log_likelihood(h, prediction), prediction

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 5: (N,) bool, True where the predicted class's log-likelihood is below its threshold."""
        h, prediction = self._hidden_and_prediction(x)
        thresholds = self.thresholds_.to(h.device)[prediction]
        return self._class_log_likelihood(h, prediction) < thresholds

    def calibrate(self, x_clean: torch.Tensor, *, keep: float | None = None) -> IDefender:
        """Re-set the per-class thresholds to keep a share ``keep`` (default self.keep) of clean data.

        Samples are grouped by the class the model predicts, as ``detect`` groups them.

        Every class must be predicted for some of ``x_clean`` (the error names a class that is not).
        """
        self._check_fitted()
        keep = self.keep if keep is None else _check_keep(keep)
        h, prediction = self._hidden_and_prediction(x_clean)
        if h.shape[0] == 0:
            raise ValueError("x_clean is empty; calibration needs clean samples")
        self._set_thresholds(self._class_log_likelihood(h, prediction), prediction, keep)
        return self

    def calibrate_scores(self, scores: object, classes: object, *, keep: float | None = None) -> IDefender:
        """Re-set the per-class thresholds from clean scores already computed, without a forward pass.

        Why: a caller that keeps its clean calibration scores (the ART adapter) can move the thresholds to
        another ``keep`` and get what :meth:`calibrate` gives on the images those scores came from.
        ``scores`` (N,): ``score_and_prediction(x_clean)[0]`` (-log-likelihoods); ``classes`` (N,) its
        predicted classes. Every class must occur among ``classes`` (the error names one that does not).
        """
        self._check_fitted()
        keep = self.keep if keep is None else _check_keep(keep)
        values = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        labels = torch.as_tensor(np.asarray(classes, dtype=np.int64))
        self._set_thresholds(-values, labels, keep)
        return self

    # -------------------------------------------------------------------------------------------- state
    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The fitted detector as (arrays, JSON-able dict), saved without pickle; :meth:`from_state` inverts.

        Arrays: ``kept_features`` (D_all,) bool, ``thresholds`` (n_classes,) float64 and per class c
        ``mixture.c.weight``, ``.mean``, ``.covariance``, ``.precisions_cholesky`` (float64, as sklearn).
        Dict: ``config`` (the constructor's arguments but model, preprocessing and batch_size), ``n_classes``,
        ``input_shape``, ``keep`` (the share the thresholds keep) and per class ``mixtures``: ``converged``,
        ``n_iter``, ``lower_bound``.
        """
        self._check_fitted()
        arrays = {
            "kept_features": self.kept_features_.cpu().numpy().astype(bool),
            "thresholds": self.thresholds_.cpu().numpy().astype(np.float64),
        }
        for label, mixture in enumerate(self.mixtures_):
            for name, attribute in _MIXTURE_ARRAYS.items():
                arrays[f"mixture.{label}.{name}"] = np.array(getattr(mixture, attribute), dtype=np.float64)
        state = {
            "config": {name: getattr(self, name) for name in _CONFIG},
            "n_classes": self.n_classes_,
            "input_shape": list(self.input_shape_),
            "keep": self.keep_,
            "mixtures": [
                {
                    "converged": bool(mixture.converged_),
                    "n_iter": int(mixture.n_iter_),
                    "lower_bound": float(mixture.lower_bound_),
                }
                for mixture in self.mixtures_
            ],
        }
        return arrays, state

    @classmethod
    def from_state(
        cls,
        model: nn.Module,
        arrays: Mapping[str, np.ndarray],
        state: Mapping[str, Any],
        *,
        preprocessing: object = None,
        batch_size: int = 256,
    ) -> IDefender:
        """The fitted detector :meth:`to_state` gave, for ``model`` (the network it was fitted on).

        ``preprocessing`` and ``batch_size`` are the caller's, as in the constructor (not part of the fit).
        The arrays are checked against the configuration, and one sample through the model against the
        number of classes and hidden features, before the sklearn mixtures are rebuilt (no pickle).
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("config"), Mapping):
            raise ValueError("state must be the dict IDefender.to_state() returned (with a 'config' dict)")
        detector = cls(model, **state["config"], preprocessing=preprocessing, batch_size=batch_size)
        missing = sorted({"n_classes", "input_shape", "keep", "mixtures"} - set(state))
        if missing:
            raise ValueError(f"state lacks {missing}: not the dict IDefender.to_state() returned")
        n_classes, extras = int(state["n_classes"]), state["mixtures"]
        if len(extras) != n_classes:
            raise ValueError(f"state describes {len(extras)} mixtures for {n_classes} classes")
        kept = np.array(_array(arrays, "kept_features"))
        thresholds = np.array(_array(arrays, "thresholds"), dtype=np.float64)
        if kept.dtype != bool or kept.ndim != 1 or not kept.any() or thresholds.shape != (n_classes,):
            raise ValueError(
                f"kept_features must be a 1-D bool array with a True entry and thresholds shaped "
                f"({n_classes},); got {kept.dtype} {kept.shape} and {thresholds.shape}"
            )
        input_shape = tuple(int(size) for size in state["input_shape"])
        device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
        probe = torch.zeros(1, *input_shape, device=device)
        norm = as_preprocessing(preprocessing, probe)
        hidden, logits = detector._forward(probe, norm)
        if hidden.shape[1] != kept.size or logits.shape[1] != n_classes:
            raise ValueError(
                f"the state has {kept.size} hidden features and {n_classes} classes; the model gives "
                f"{hidden.shape[1]} and {logits.shape[1]}: it was fitted on another model or layer"
            )
        detector.mixtures_ = [
            _rebuilt_mixture(detector, arrays, label, extra, int(kept.sum()))
            for label, extra in enumerate(extras)
        ]
        detector.kept_features_ = torch.as_tensor(kept)
        detector.n_classes_ = n_classes
        detector.input_shape_ = input_shape
        detector.thresholds_ = torch.as_tensor(thresholds)
        detector.keep_ = _check_keep(state["keep"])
        detector._norm = norm
        detector._params = [_mixture_tensors(mixture, torch.device("cpu")) for mixture in detector.mixtures_]
        return detector

    # ---------------------------------------------------------------------------------------- internals
    def _set_thresholds(self, log_likelihood: torch.Tensor, classes: torch.Tensor, keep: float) -> None:
        # Scores are -log-likelihood; the shared calibration flags score > t at fpr = 1 - keep, i.e. ll < -t.
        scores = -log_likelihood.detach().cpu().numpy()
        thresholds = per_class_thresholds(scores, classes.cpu().numpy(), self.n_classes_, 1.0 - keep)
        self.thresholds_ = torch.as_tensor(-thresholds, dtype=torch.float64)
        self.keep_ = keep

    def _class_log_likelihood(self, h: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """log p(h_i | classes_i): each sample under one class's mixture, grouped by class, not per sample."""
        out = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
        for label in torch.unique(classes).tolist():
            rows = classes == label
            out[rows] = _log_likelihood(h[rows], *self._on(label, h.device), self.covariance_type)
        return out

    def _on(self, label: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(tensor.to(device) for tensor in self._params[label])

    def _hidden_and_prediction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        x = check_batch(x)
        if tuple(x.shape[1:]) != self.input_shape_:
            raise ValueError(
                f"x must be shaped (N, {', '.join(map(str, self.input_shape_))}); got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            n_kept = int(self.kept_features_.sum())
            empty = torch.empty(0, n_kept, dtype=torch.float64, device=x.device)
            return empty, torch.empty(0, dtype=torch.long, device=x.device)
        norm = None if self._norm is None else tuple(t.to(x.device) for t in self._norm)
        hidden, logits = self._forward(x, norm)
        return hidden[:, self.kept_features_.to(x.device)], logits.argmax(1)

    def _forward(self, x: torch.Tensor, norm: object) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (N, D_all) float64, logits (N, K)) in one pass per mini-batch; with a graph back
        to ``x`` only when ``x`` requires grad and grad mode is on."""
        (name,) = self._extractor.layers
        dtype = model_dtype(self.model)
        differentiable = torch.is_grad_enabled() and x.requires_grad
        hidden, logits = [], []
        capturing = self._extractor.capturing(detach=not differentiable)
        with capturing as captured, torch.set_grad_enabled(differentiable):
            for start in range(0, x.shape[0], self.batch_size):
                batch = x[start : start + self.batch_size]
                if norm is not None:
                    mean, std = norm
                    batch = (batch - mean.to(batch.dtype)) / std.to(batch.dtype)
                logits.append(self.model(batch.to(dtype)))
                hidden.append(pooled(captured.pop(name)).to(torch.float64))
        return torch.cat(hidden), torch.cat(logits)

    def _check_fitted(self) -> None:
        if not hasattr(self, "mixtures_"):
            raise RuntimeError("this IDefender is not fitted yet; call fit(x, y) first")


def _array(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"arrays lacks {name!r}: not the arrays IDefender.to_state() returned")
    return arrays[name]


def _rebuilt_mixture(
    detector: IDefender,
    arrays: Mapping[str, np.ndarray],
    label: int,
    extra: Mapping[str, Any],
    n_features: int,
) -> GaussianMixture:
    """Class ``label``'s fitted sklearn GaussianMixture, from its arrays, after checking their shapes."""
    k, d, kind = detector.n_components, n_features, detector.covariance_type
    covariance_shape = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[kind]
    shapes = {
        "weight": (k,),
        "mean": (k, d),
        "covariance": covariance_shape,
        "precisions_cholesky": covariance_shape,
    }
    mixture = GaussianMixture(
        k, covariance_type=kind, reg_covar=detector.reg_covar, random_state=detector.random_state
    )
    for name, shape in shapes.items():
        value = np.array(_array(arrays, f"mixture.{label}.{name}"), dtype=np.float64)
        if value.shape != shape or not np.isfinite(value).all():
            raise ValueError(f"mixture.{label}.{name} must be finite and shaped {shape}; got {value.shape}")
        setattr(mixture, _MIXTURE_ARRAYS[name], value)
    cholesky = mixture.precisions_cholesky_
    if kind == "full":
        mixture.precisions_ = cholesky @ np.swapaxes(cholesky, -1, -2)
    elif kind == "tied":
        mixture.precisions_ = cholesky @ cholesky.T
    else:
        mixture.precisions_ = cholesky**2
    mixture.converged_ = bool(extra["converged"])
    mixture.n_iter_ = int(extra["n_iter"])
    mixture.lower_bound_ = float(extra["lower_bound"])
    mixture.n_features_in_ = d
    return mixture


def _check_keep(keep: object) -> float:
    if not _is_number(keep) or not 0 < keep < 1:  # type: ignore[operator]
        raise ValueError(f"keep must be a number in (0, 1) (share of clean samples kept); got {keep!r}")
    return float(keep)  # type: ignore[arg-type]


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
