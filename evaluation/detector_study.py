"""The detector study (seeds 000, 002, 003): each detector against each attack's successful examples.

Fitting on a seeded subset of the training split, thresholds set on clean test images outside the
evaluated sample (``calibration_samples``; our ART detectors' ``x_calibration``), evaluation on the
sample: three disjoint sets. Negatives are the initially correct clean test images, positives the
successful adversarial examples of one attack (n stated per row). Per pair: ROC curve, AUC, TPR at FPR
1/5/10% (Amirian Table 1), EER accuracy (Carrara Table 2) and the operating point of the detector's own
calibrated threshold (for I-defender with keep=0.95 / 0.99 that is ID-95 / ID-99). The "authentic errors"
row scores the clean images the model misclassifies against the correct ones (Carrara). ART's
BinaryInputDetector and BinaryActivationDetector are peers: trained on adversarial examples of one named
attack.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from xaiadv.bridge.registry import ParameterError, blame_refusal, build_attack, check_parameter_names

from .config import DetectorSpec
from .metrics import equal_error_accuracy, operating_point, roc_auc, roc_curve, tpr_at_fpr

logger = logging.getLogger(__name__)

FPR_POINTS = (0.01, 0.05, 0.10)
#: Training of ART's peer detectors (their own small networks).
PEER_EPOCHS = 5
PEER_LR = 1e-3

#: The parameters ART's peer detectors take in a run config, with their defaults (None: chosen at fit).
PEER_PARAMS: dict[str, dict[str, Any]] = {
    "art:BinaryInputDetector": {"epochs": PEER_EPOCHS},
    "art:BinaryActivationDetector": {"epochs": PEER_EPOCHS, "layer": None},
}

#: (scores, flags) of a fitted detector on a batch of inputs.
Detect = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def art_classifier(
    model: nn.Module, input_shape: tuple[int, ...], n_classes: int, device: torch.device
) -> Any:
    """ART's PyTorchClassifier of the evaluated model on [0, 1] inputs."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=n_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def check_detector(spec: DetectorSpec, classifier: Any) -> None:
    """Build the detector of ``spec`` on ``classifier`` (ART's, of the run's model) without fitting it.

    Raises :class:`ParameterError` naming the parameter: unknown (with the nearest valid name), or
    refused by the detector's own validation.
    """
    if spec.name.startswith("xaiadv:"):
        from xaiadv.bridge import art as bridge_art

        cls = getattr(bridge_art, spec.name.partition(":")[2])
        check_parameter_names(spec.name, spec.params, {**cls.plugin_params, **cls.calibration_params})
        blame_refusal(spec.name, spec.params, lambda chosen: cls(classifier, **chosen))
    else:
        _peer_layer(spec, classifier)


def _peer_layer(spec: DetectorSpec, classifier: Any) -> str | None:
    """Check a peer's parameters; the layer BinaryActivationDetector reads (default the second to last)."""
    check_parameter_names(spec.name, spec.params, PEER_PARAMS[spec.name])
    epochs = spec.params.get("epochs", PEER_EPOCHS)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ParameterError("epochs", f"expected an integer > 0, got {epochs!r}")
    if spec.name != "art:BinaryActivationDetector":
        return None
    layer = spec.params.get("layer", classifier.layer_names[-2])
    if layer not in classifier.layer_names:
        raise ParameterError(
            "layer",
            f"{spec.name} refused it (ValueError: {layer!r} is not a layer of the model; its layers: "
            f"{', '.join(classifier.layer_names)})",
        )
    return layer


def fit_detector(
    spec: DetectorSpec,
    model: nn.Module,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    *,
    x_calibration: np.ndarray | None = None,
    n_classes: int,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> Detect:
    """Fit one detector on clean training images; returns its scoring function.

    Ours set their threshold on ``x_calibration`` (clean images of another split) when given, else on a
    held-out share of ``x_fit``; ART's peers decide by their own network's argmax.
    """
    if spec.name.startswith("xaiadv:"):
        return _fit_ours(spec, model, x_fit, y_fit, x_calibration, n_classes, batch_size, device)
    return _fit_peer(spec, model, x_fit, y_fit, n_classes, batch_size, device, seed)


def _fit_ours(
    spec: DetectorSpec,
    model: nn.Module,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_calibration: np.ndarray | None,
    n_classes: int,
    batch_size: int,
    device: torch.device,
) -> Detect:
    from xaiadv.bridge import art as bridge_art

    classifier = art_classifier(model, x_fit.shape[1:], n_classes, device)
    detector = getattr(bridge_art, spec.name.partition(":")[2])(classifier, **spec.params)
    detector.fit(x_fit, y_fit, batch_size=batch_size, x_calibration=x_calibration)

    def detect(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        report, flags = detector.detect(x, batch_size=batch_size)
        return report["score"], flags

    return detect


def _fit_peer(
    spec: DetectorSpec,
    model: nn.Module,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    n_classes: int,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> Detect:
    """ART's trained detectors on ``train_samples`` clean images and their ``train_attack`` examples.

    The peer gets its own copy of the model: ART's ``get_activations`` leaves a forward hook on it.
    """
    from art.defences.detector.evasion import BinaryActivationDetector, BinaryInputDetector

    n_train = min(spec.train_samples, len(x_fit))
    x_clean, y_clean = x_fit[:n_train], y_fit[:n_train]
    attack = build_attack(spec.train_attack, model=model, bounds=(0.0, 1.0), **spec.train_params)
    x_adv = np.concatenate(
        [
            attack(torch.as_tensor(x_clean[i : i + batch_size]), torch.as_tensor(y_clean[i : i + batch_size]))
            .detach()
            .cpu()
            .numpy()
            for i in range(0, n_train, batch_size)
        ]
    )
    x_train = np.concatenate([x_clean, x_adv]).astype(np.float32)
    y_train = np.eye(2, dtype=np.float32)[np.repeat([0, 1], n_train)]
    own_model = copy.deepcopy(model)
    classifier = art_classifier(own_model, x_fit.shape[1:], n_classes, device)
    torch.manual_seed(seed)
    if spec.name == "art:BinaryInputDetector":
        network = _input_detector_network(x_fit.shape[1:])
        detector = BinaryInputDetector(_binary_classifier(network, x_fit.shape[1:], device))
    else:
        layer = _peer_layer(spec, classifier)
        width = int(np.prod(classifier.get_activations(x_fit[:1], layer, 1).shape[1:]))
        network = nn.Sequential(nn.Flatten(), nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 2))
        detector = BinaryActivationDetector(classifier, _binary_classifier(network, (width,), device), layer)
    epochs = int(spec.params.get("epochs", PEER_EPOCHS))
    detector.fit(x_train, y_train, nb_epochs=epochs, batch_size=batch_size)

    def detect(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        report, flags = detector.detect(x.astype(np.float32), batch_size=batch_size)
        predictions = report["predictions"] if isinstance(report, Mapping) else report
        return (predictions[:, 1] - predictions[:, 0]).astype(np.float64), np.asarray(flags, dtype=bool)

    return detect


def _input_detector_network(input_shape: tuple[int, ...]) -> nn.Module:
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (height // 2) * (width // 2), 64),
        nn.ReLU(),
        nn.Linear(64, 2),
    )


def _binary_classifier(network: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> Any:
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        network,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(network.parameters(), lr=PEER_LR),
        input_shape=tuple(input_shape),
        nb_classes=2,
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def separation(
    clean_scores: np.ndarray, positive_scores: np.ndarray, clean_flags: np.ndarray, flags: np.ndarray
) -> dict[str, Any]:
    """Every figure of one negatives-vs-positives pair; undefined ones are None with a reason."""
    if len(positive_scores) == 0 or len(clean_scores) == 0:
        return {"n": len(positive_scores), "n_clean": len(clean_scores), "reason": "no samples"}
    fpr, tpr, _ = roc_curve(clean_scores, positive_scores)
    accuracy, _ = equal_error_accuracy(clean_scores, positive_scores)
    own_fpr, own_tpr = operating_point(clean_flags, flags)
    return {
        "n": len(positive_scores),
        "n_clean": len(clean_scores),
        "auc": roc_auc(clean_scores, positive_scores),
        "tpr_at_fpr": {
            f"{point:g}": tpr_at_fpr(clean_scores, positive_scores, point) for point in FPR_POINTS
        },
        "eer_accuracy": accuracy,
        "threshold_fpr": own_fpr,
        "threshold_tpr": own_tpr,
        "roc": {"fpr": fpr, "tpr": tpr},
    }
