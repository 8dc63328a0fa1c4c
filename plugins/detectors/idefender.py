"""I-defender (Zheng & Hong 2018, seeds/002): per-class Gaussian mixtures of a fully-connected hidden state.

Adversarial inputs that the network assigns to class c produce hidden states in low-density regions of
the hidden-state distribution of natural class-c data. One Gaussian mixture per class models that
distribution (eq. 4); an input is rejected when its log-likelihood under the mixture of its *predicted*
class falls below that class's threshold (eq. 5). Everything is float64 and in log space.

Thresholds, per class (eq. 5), grouped by the class the model predicts. The paper sets them on the
training data, keeping a share ``keep`` of it (ID-95: keep=0.95, ID-99: 0.99; here ``fpr = 1 - keep``):
``fit(x, y).calibrate(x, y)``. Full-covariance mixtures over-fit their own data, so those quantiles reject
far more than 1 - keep of unseen clean data. Measured on the conftest digits CNN (224 live features of the
256-d input of its last Linear, 1300 training / 497 test images, full covariance, keep=0.95), clean
false-positive rate on the test images, used neither for fitting nor for calibration:

    thresholds on the training data                1.000  (every test image rejected)
    held out, share 0.2, K=5, reg_covar 1e-4       0.050 .. 0.097 over 5 split seeds (mean 0.072)
    held out, share 0.3, K=5, reg_covar 1e-2       0.042 .. 0.064 over 5 split seeds (mean 0.054)

Held-out thresholds are order statistics of a few clean scores per class: flagging the top m of n
gives an expected unseen rate of (m + 1) / (n + 1), so too small a calibration share biases the rate
upwards (2/27 = 7.4% with ~26 samples per class at share 0.2). ``fit_calibrated(x, y,
calibration_share=0.3)`` holds that share out; with the defaults (``n_components=5``, ``reg_covar=1e-2``)
it is the last row, and the FGSM (eps=0.15) ROC AUC on the same model is 0.955 .. 0.982 (n_components=1 or
2 gives 0.99 there, where each class has only ~90 fitting samples in 224 dimensions).

Detector-aware attacks need the gradient of eq. 4 with respect to the input: ``score_torch(x)`` and
``log_likelihood(x)`` keep the graph back to ``x`` through the model when ``x`` requires grad.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

from .. import checks
from ..checks import check_batch, check_labels
from ..features import FeatureExtractor, check_layers, last_layer_of_type, pooled
from ..model import Classifier
from .base import Detector, Parts

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_LOG_2PI = math.log(2.0 * math.pi)
#: Array name in :meth:`IDefender.get_state` -> the fitted sklearn GaussianMixture attribute it holds.
_MIXTURE_ARRAYS = {
    "weight": "weights_",
    "mean": "means_",
    "covariance": "covariances_",
    "precisions_cholesky": "precisions_cholesky_",
}


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


class IDefender(Detector):
    """Zheng & Hong 2018: per-class Gaussian mixtures of a fully-connected layer's hidden state (eqs. 4-5).

    Hidden state: by default the *input* of the model's last ``nn.Linear`` (the last fully-connected hidden
    layer's activations); ``layer=`` names a layer whose *output* is used instead (convolutional maps are
    globally average-pooled). Features constant over the fitting data (dead units) are dropped
    (``kept_features_``); ``reg_covar`` keeps duplicate points and per-class constant features from making a
    covariance singular. ``score(x)`` is -log p(h(x) | predicted class); ``calibrate`` sets one threshold
    per class by default (eq. 5; see the module docstring for where to set them).

    Fitted attributes: ``mixtures_`` (one sklearn GaussianMixture per class), ``kept_features_`` (bool (D,)),
    ``n_classes_``, ``input_shape_``.
    """

    config_names = ("layer", "n_components", "covariance_type", "reg_covar", "random_state")
    per_class_default = True

    def __init__(
        self,
        model: Classifier | nn.Module,
        *,
        layer: str | None = None,
        n_components: int = 5,
        covariance_type: str = "full",
        reg_covar: float = 1e-2,
        batch_size: int = 256,
        preprocessing: object = None,
        random_state: int = 0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, preprocessing=preprocessing)
        self.n_components = checks.positive_int("n_components", n_components)
        self.covariance_type = checks.one_of("covariance_type", covariance_type, COVARIANCE_TYPES)
        self.reg_covar = checks.finite_number("reg_covar", reg_covar, low=0.0, low_open=True)
        self.random_state = checks.integer("random_state", random_state)
        module = self.classifier.module
        if layer is None:
            name, capture = last_layer_of_type(module, nn.Linear), "input"
        else:
            check_layers(module, [layer])
            name, capture = layer, "output"
        self.layer = layer
        self._extractor = FeatureExtractor(module, [name], capture=capture)

    # ----------------------------------------------------------------------------------------- fitting
    def _fit(self, x: torch.Tensor, y: object) -> None:
        """One mixture per class on the hidden states of clean ``x`` (N, ...) with true labels ``y``.

        A class absent from ``x``, or with fewer samples than ``n_components``, raises naming the class
        before any mixture is fitted.
        """
        if x.shape[0] == 0:
            raise ValueError("x is empty; fit needs clean samples of every class")
        _, logits = self._forward(x[:1])  # one sample: the number of classes, to check the labels
        n_classes = logits.shape[1]
        labels = check_labels(y, x.shape[0], n_classes, torch.device("cpu")).numpy()
        counts = np.bincount(labels, minlength=n_classes)
        absent = [label for label in range(n_classes) if counts[label] == 0]
        if absent:
            raise ValueError(f"class {absent[0]} is absent from the fitting data (absent classes: {absent})")
        for label in range(n_classes):
            if counts[label] < self.n_components:
                raise ValueError(
                    f"class {label} has {counts[label]} fitting samples; n_components={self.n_components} "
                    f"needs at least that many"
                )
        hidden = self._fitting_features(x, torch.as_tensor(labels, device=x.device)).cpu().numpy()
        kept = hidden.max(0) > hidden.min(0)
        if not kept.any():
            raise ValueError("every hidden feature is constant over x: nothing for the mixtures to model")
        hidden = hidden[:, kept]
        mixtures = []
        for label in range(n_classes):  # one mixture per class: a loop over classes, not samples
            mixture = GaussianMixture(
                self.n_components,
                covariance_type=self.covariance_type,
                reg_covar=self.reg_covar,
                random_state=self.random_state,
            )
            mixtures.append(mixture.fit(hidden[labels == label]))
        self._set_fitted(mixtures, kept, n_classes, tuple(x.shape[1:]))

    def _fitting_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What class ``labels[i]``'s mixture is fitted on for sample i, (N, D_all) float64: its hidden state
        (a subclass whose features depend on the class, the LRP signatures, takes the true class)."""
        del labels
        return self._forward(x)[0]

    def _set_fitted(
        self, mixtures: list[GaussianMixture], kept: np.ndarray, n_classes: int, input_shape: tuple[int, ...]
    ) -> None:
        self.mixtures_ = mixtures
        self.kept_features_ = torch.as_tensor(kept)
        self.n_classes_ = n_classes
        self._params = [_mixture_tensors(mixture, torch.device("cpu")) for mixture in mixtures]
        self.input_shape_ = input_shape

    # ------------------------------------------------------------------------------------------ scoring
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, D) of raw inputs ``x``, dead features removed, float64 on x's device."""
        return self._hidden_and_prediction(self._checked(x))[0]

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(h(x) | class c) under each class's mixture (eq. 4): (N, n_classes) float64 on x's device.

        Column c equals ``mixtures_[c].score_samples(hidden(x))``. Differentiable: when ``x`` requires grad
        (and grad mode is on) the result carries the graph back to ``x`` through the model (hooks removed
        after), for detector-aware attacks; otherwise it is computed without one.
        """
        h, _ = self._hidden_and_prediction(self._checked(x))
        device = h.device
        columns = [
            _log_likelihood(h, *self._on(c, device), self.covariance_type) for c in range(self.n_classes_)
        ]
        return torch.stack(columns, dim=1)

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`score`, -log p(h(x) | predicted class), with the graph back to ``x`` when it requires
        grad: eq. 4 is smooth in the hidden state, the predicted class a discrete choice held fixed."""
        with torch.enable_grad():
            return self._scored(x)["score"]

    def _parts(self, x: torch.Tensor) -> Parts:
        """-log p(h(x) | predicted class) (N,) float64 and the predicted class."""
        h, prediction = self._hidden_and_prediction(x)
        return {"score": -self._class_log_likelihood(h, prediction), "class": prediction}

    # -------------------------------------------------------------------------------------------- state
    def _fitted_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays: ``kept_features`` (D_all,) bool and per class c ``mixture.c.weight``, ``.mean``,
        ``.covariance``, ``.precisions_cholesky`` (float64, as sklearn); dict: ``n_classes``, ``input_shape``
        and per class ``mixtures``: ``converged``, ``n_iter``, ``lower_bound``."""
        arrays = {"kept_features": self.kept_features_.cpu().numpy().astype(bool)}
        for label, mixture in enumerate(self.mixtures_):
            for name, attribute in _MIXTURE_ARRAYS.items():
                arrays[f"mixture.{label}.{name}"] = np.array(getattr(mixture, attribute), dtype=np.float64)
        fitted = {
            "n_classes": self.n_classes_,
            "input_shape": list(self.input_shape_),
            "mixtures": [
                {
                    "converged": bool(mixture.converged_),
                    "n_iter": int(mixture.n_iter_),
                    "lower_bound": float(mixture.lower_bound_),
                }
                for mixture in self.mixtures_
            ],
        }
        return arrays, fitted

    def _restore(self, arrays: Mapping[str, np.ndarray], fitted: Mapping[str, Any]) -> None:
        """The arrays checked against the configuration, and one sample through the model against the
        number of classes and hidden features, before the sklearn mixtures are rebuilt (no pickle)."""
        missing = sorted({"n_classes", "input_shape", "mixtures"} - set(fitted))
        if missing:
            raise ValueError(f"state lacks {missing}: not the dict IDefender.get_state() returned")
        n_classes, extras = int(fitted["n_classes"]), fitted["mixtures"]
        if len(extras) != n_classes:
            raise ValueError(f"state describes {len(extras)} mixtures for {n_classes} classes")
        kept = np.array(_array(arrays, "kept_features"))
        if kept.dtype != bool or kept.ndim != 1 or not kept.any():
            raise ValueError(
                f"kept_features must be a 1-D bool array with a True entry; got {kept.dtype} {kept.shape}"
            )
        input_shape = tuple(int(size) for size in fitted["input_shape"])
        hidden, logits = self._forward(torch.zeros(1, *input_shape, device=self.classifier.device))
        if hidden.shape[1] != kept.size or logits.shape[1] != n_classes:
            raise ValueError(
                f"the state has {kept.size} hidden features and {n_classes} classes; the model gives "
                f"{hidden.shape[1]} and {logits.shape[1]}: it was fitted on another model or layer"
            )
        mixtures = [
            _rebuilt_mixture(self, arrays, label, extra, int(kept.sum()))
            for label, extra in enumerate(extras)
        ]
        self._set_fitted(mixtures, kept, n_classes, input_shape)

    # ---------------------------------------------------------------------------------------- internals
    def _checked(self, x: object) -> torch.Tensor:
        self._check_fitted()
        return check_batch(x, input_shape=self.input_shape_)

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
        if x.shape[0] == 0:
            n_kept = int(self.kept_features_.sum())
            empty = torch.empty(0, n_kept, dtype=torch.float64, device=x.device)
            return empty, torch.empty(0, dtype=torch.long, device=x.device)
        hidden, logits = self._forward(x)
        return hidden[:, self.kept_features_.to(x.device)], logits.argmax(1)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (N, D_all) float64, logits (N, K)) in one pass per mini-batch; with a graph back
        to ``x`` only when ``x`` requires grad and grad mode is on."""
        (name,) = self._extractor.layers
        differentiable = torch.is_grad_enabled() and x.requires_grad
        hidden, logits = [], []
        capturing = self._extractor.capturing(detach=not differentiable)
        with capturing as captured, torch.set_grad_enabled(differentiable):
            for start in range(0, x.shape[0], self.batch_size):
                logits.append(self.classifier.logits(x[start : start + self.batch_size]))
                hidden.append(pooled(captured.pop(name)).to(torch.float64))
        return torch.cat(hidden), torch.cat(logits)


def _array(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"arrays lacks {name!r}: not the arrays IDefender.get_state() returned")
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
