"""The detector study (seeds 000, 002, 003): each detector against each attack's successful examples.

Fitting on a seeded subset of the training split, thresholds set on clean test images outside the
evaluated sample (``calibration_samples``; our ART detectors' ``x_calibration``), evaluation on the
sample: three disjoint sets. Negatives are the initially correct clean test images, positives the
successful adversarial examples of one attack (n stated per row). Per pair: ROC curve, AUC, TPR at FPR
1/5/10% (Amirian Table 1), EER accuracy (Carrara Table 2) and the operating point of the detector's own
calibrated threshold (for I-defender with keep=0.95 / 0.99 that is ID-95 / ID-99). The "authentic errors"
row scores the clean images the model misclassifies against the correct ones (Carrara).

Detectors are named through the one detector registry (``xaiadv.bridge.registry.detectors``): ours are
registered by ``xaiadv.bridge.art_detectors``, ART's BinaryInputDetector and BinaryActivationDetector
here, as peers trained on adversarial examples of one named attack (:class:`TrainedPeer`).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xaiadv.bridge.registry import (
    ParameterError,
    Registry,
    art_classifier,
    blame_refusal,
    check_parameter_names,
    detectors,
)

from .adaptive_study import AdaptiveSettings, adaptive_cell, adaptive_scorer, blind_pgd
from .data import training_subset
from .metrics import equal_error_accuracy, operating_point, roc_auc, roc_curve, tpr_at_fpr
from .models import craft_adversarial
from .studies import Study, studies

if TYPE_CHECKING:
    from .config import DetectorSpec, RunConfig
    from .run import Run

logger = logging.getLogger(__name__)

FPR_POINTS = (0.01, 0.05, 0.10)
#: Training of ART's peer detectors (their own small networks).
PEER_EPOCHS = 5
PEER_LR = 1e-3
BOUNDS = (0.0, 1.0)

#: (scores, flags) of a fitted detector on a batch of inputs.
Detect = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# -------------------------------------------------------------------------------------------------
# the detectors a run can name


class TrainedPeer(abc.ABC):
    """ART's detectors trained on adversarial examples of one attack (a run's ``train_attack``).

    What the registry holds for ``art:BinaryInputDetector`` and ``art:BinaryActivationDetector``: the
    parameters a run config may give them (``params``, with defaults; None: chosen at fit) and
    :meth:`build`, which makes the ART detector around its own small network, ready to be trained.
    """

    params: ClassVar[dict[str, Any]] = {"epochs": PEER_EPOCHS}

    @classmethod
    def check(cls, spec: DetectorSpec, classifier: Any) -> None:
        """Refuse an unknown parameter (with the nearest name) or an epoch count that is not > 0."""
        check_parameter_names(spec.name, spec.params, cls.params)
        epochs = spec.params.get("epochs", PEER_EPOCHS)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ParameterError("epochs", f"expected an integer > 0, got {epochs!r}")

    @classmethod
    @abc.abstractmethod
    def build(cls, spec: DetectorSpec, classifier: Any, input_shape: tuple[int, ...]) -> Any:
        """The ART detector, untrained; ``classifier`` is ART's classifier of (a copy of) the model."""


@detectors.register("art:BinaryInputDetector")
class BinaryInputPeer(TrainedPeer):
    """ART's ``BinaryInputDetector``: a small CNN on the input, clean (0) or adversarial (1)."""

    @classmethod
    def build(cls, spec: DetectorSpec, classifier: Any, input_shape: tuple[int, ...]) -> Any:
        from art.defences.detector.evasion import BinaryInputDetector

        network = _input_detector_network(input_shape)
        return BinaryInputDetector(_binary_classifier(network, input_shape, classifier))


@detectors.register("art:BinaryActivationDetector")
class BinaryActivationPeer(TrainedPeer):
    """ART's ``BinaryActivationDetector``: a small MLP on the model's activations at ``layer``."""

    params: ClassVar[dict[str, Any]] = {"epochs": PEER_EPOCHS, "layer": None}

    @classmethod
    def check(cls, spec: DetectorSpec, classifier: Any) -> None:
        super().check(spec, classifier)
        cls.layer(spec, classifier)

    @classmethod
    def layer(cls, spec: DetectorSpec, classifier: Any) -> str:
        """The layer the detector reads: ``params.layer``, by default the model's second to last."""
        layer = spec.params.get("layer", classifier.layer_names[-2])
        if layer not in classifier.layer_names:
            raise ParameterError(
                "layer",
                f"{spec.name} refused it (ValueError: {layer!r} is not a layer of the model; its layers: "
                f"{', '.join(classifier.layer_names)})",
            )
        return layer

    @classmethod
    def build(cls, spec: DetectorSpec, classifier: Any, input_shape: tuple[int, ...]) -> Any:
        from art.defences.detector.evasion import BinaryActivationDetector

        layer = cls.layer(spec, classifier)
        probe = np.zeros((1, *input_shape), dtype=np.float32)
        width = int(np.prod(classifier.get_activations(probe, layer, 1).shape[1:]))
        network = nn.Sequential(nn.Flatten(), nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 2))
        return BinaryActivationDetector(classifier, _binary_classifier(network, (width,), classifier), layer)


def detector_registry() -> Registry:
    """The detector registry, filled: ours (``xaiadv.bridge.art_detectors``) and ART's peers (here)."""
    import xaiadv.bridge.art_detectors  # noqa: F401  (its @detectors.register fills the registry)

    return detectors


def is_trained_peer(name: str) -> bool:
    """Whether detector ``name`` is trained on adversarial examples (it then needs a ``train_attack``)."""
    entry = detector_registry()[name]
    return isinstance(entry, type) and issubclass(entry, TrainedPeer)


def check_detector(spec: DetectorSpec, classifier: Any) -> None:
    """Build the detector of ``spec`` on ``classifier`` (ART's, of the run's model) without fitting it.

    Raises :class:`ParameterError` naming the parameter: unknown (with the nearest valid name), or
    refused by the detector's own validation.
    """
    cls = detector_registry()[spec.name]
    if is_trained_peer(spec.name):
        cls.check(spec, classifier)
        return
    check_parameter_names(spec.name, spec.params, {**cls.plugin_params, **cls.calibration_params})
    blame_refusal(spec.name, spec.params, lambda chosen: cls(classifier, **chosen))


def _device_type(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


# -------------------------------------------------------------------------------------------------
# fitting and scoring


def fit_detector(
    spec: DetectorSpec,
    model: nn.Module,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    *,
    x_calibration: np.ndarray | None = None,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> Detect:
    """Fit one detector on clean training images; returns its scoring function.

    Ours set their threshold on ``x_calibration`` (clean images of another split) when given, else on a
    held-out share of ``x_fit``; ART's peers decide by their own network's argmax.
    """
    return fit_detector_object(
        spec,
        model,
        x_fit,
        y_fit,
        x_calibration=x_calibration,
        batch_size=batch_size,
        device=device,
        seed=seed,
    )[0]


def fit_detector_object(
    spec: DetectorSpec,
    model: nn.Module,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    *,
    x_calibration: np.ndarray | None,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> tuple[Detect, Any]:
    """:func:`fit_detector`'s scoring function and the fitted ART detector of ours it calls (None for ART's
    trained peers): the adaptive attack differentiates through the latter's plugin."""
    if is_trained_peer(spec.name):
        return _fit_peer(spec, model, x_fit, y_fit, batch_size, device, seed), None
    classifier = art_classifier(model, x_fit.shape[1:], BOUNDS, None, _device_type(device))
    detector = detector_registry()[spec.name](classifier, **spec.params)
    detector.fit(x_fit, y_fit, batch_size=batch_size, x_calibration=x_calibration)
    return scoring(detector, batch_size), detector


def scoring(detector: Any, batch_size: int) -> Detect:
    """The scoring function of a fitted ART detector of ours: (scores, flags) of a batch."""

    def detect(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        report, flags = detector.detect(x, batch_size=batch_size)
        return report["score"], flags

    return detect


def _fit_peer(
    spec: DetectorSpec,
    model: nn.Module,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> Detect:
    """ART's trained detectors on ``train_samples`` clean images and their ``train_attack`` examples.

    The peer gets its own copy of the model: ART's ``get_activations`` leaves a forward hook on it.
    """
    n_train = min(spec.train_samples, len(x_fit))
    x_clean, y_clean = x_fit[:n_train], y_fit[:n_train]
    x_adv = craft_adversarial(
        model,
        torch.as_tensor(x_clean),
        torch.as_tensor(y_clean),
        attack=spec.train_attack,
        params=spec.train_params,
        bounds=BOUNDS,
        batch_size=batch_size,
        device=device,
    ).numpy()
    x_train = np.concatenate([x_clean, x_adv]).astype(np.float32)
    y_train = np.eye(2, dtype=np.float32)[np.repeat([0, 1], n_train)]
    own_model = copy.deepcopy(model)
    classifier = art_classifier(own_model, x_fit.shape[1:], BOUNDS, None, _device_type(device))
    torch.manual_seed(seed)
    detector = detector_registry()[spec.name].build(spec, classifier, x_fit.shape[1:])
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


def _binary_classifier(network: nn.Module, input_shape: tuple[int, ...], beside: Any) -> Any:
    """ART's trainable classifier of a peer's own network (with its optimizer), on ``beside``'s device."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        network,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(network.parameters(), lr=PEER_LR),
        input_shape=tuple(input_shape),
        nb_classes=2,
        device_type="gpu" if beside.device.type == "cuda" else "cpu",
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


# -------------------------------------------------------------------------------------------------
# the study: one cell per detector


@dataclass(frozen=True)
class CleanSplits:
    """The clean images a detector learns from: the fitting subset of the training split, and the test
    images after the evaluated sample that set our detectors' thresholds (none: a held-out share).

    A cell builds them from its run where it runs (:meth:`of`, a seeded subset: milliseconds), so that a Ray
    task carries no images: the run's data reach each worker once, through the object store."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_calibration: np.ndarray

    @classmethod
    def of(cls, run: Run) -> CleanSplits:
        config = run.config
        fit = training_subset(run.data, config.fit_samples, config.seed)
        x_calibration = run.data.x_test[config.samples : config.samples + config.calibration_samples]
        return cls(fit.x_train, fit.y_train, x_calibration)


@studies.register("xaiadv:DetectorStudy")
@dataclass(frozen=True)
class DetectorStudy(Study):
    """Each of the run's detectors fitted once and scored against every finished attack: one cell each.

    A detector's cell is keyed by its spec, the clean splits' sizes and the keys of the attack cells it
    scores, so it is recomputed when any of them changes. ``adaptive`` (None: no adaptive column): the
    budgets of :mod:`~xaiadv.evaluation.adaptive_study`, one cell per detector and budget, keyed by the
    spec, the splits and the settings.
    """

    adaptive: AdaptiveSettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "adaptive", AdaptiveSettings.of(self.adaptive))

    def cell_count(self, config: RunConfig) -> int:
        budgets = 0 if self.adaptive is None else len(self.adaptive.eps) + self.adaptive.unbounded
        fits = {
            (spec.name, repr(sorted(fit_params(spec).items())))
            for spec in config.detectors
            if not is_trained_peer(spec.name)
        }
        blind = budgets if config.detectors else 0  # one blind PGD per budget, shared by the detectors
        return len(fits) + blind + len(config.detectors) * (1 + budgets)

    def run(self, run: Run) -> None:
        if not run.config.detectors:
            return
        done = [label for label, cell in run.attacks.items() if cell["status"] == "done"]
        n_calibration = len(CleanSplits.of(run).x_calibration)
        fits = self._fit_cells(run, n_calibration)
        blind = self._blind_cells(run) if self.adaptive is not None else {}
        for spec in tqdm(run.config.detectors, desc="detectors", disable=not run.progress):
            fit = fits.get(spec.label)
            if fit is not None:
                fit = dict(fit)  # read here, so that the cells below are submitted after the fit finished
            key = run.key(
                dataclasses.asdict(spec),
                run.config.fit_samples,
                n_calibration,
                {label: run.attacks[label]["key"] for label in done},
            )
            run.cell(
                "detector",
                spec.label,
                key,
                lambda spec=spec, fit=fit: run_detector_cell(
                    spec, run, fitted_detector(spec, run, fit), done
                ),
                about={"name": spec.name},
            )
            if self.adaptive is not None:
                self._adaptive_cells(spec, run, n_calibration, fit, blind)

    def _fit_cells(self, run: Run, n_calibration: int) -> dict[str, Mapping[str, Any]]:
        """One ``detector_fit`` cell per distinct fit of our detectors, all submitted before any is read
        (with Ray they fit side by side): per detector label, its fit cell. Detectors that differ only in
        parameters that move the threshold (I-defender's ``keep``: ID-95 and ID-99) share one fit, labelled
        by the first of them; each rebuilds it with its own threshold (:func:`fitted_detector`)."""
        cells: dict[str, Mapping[str, Any]] = {}
        by_label: dict[str, Mapping[str, Any]] = {}
        for spec in run.config.detectors:
            if is_trained_peer(spec.name):
                continue
            key = run.key(spec.name, fit_params(spec), run.config.fit_samples, n_calibration)
            if key not in cells:
                cells[key] = run.cell(
                    "detector_fit",
                    spec.label,
                    key,
                    # the splits are rebuilt where the cell runs: a Ray task then carries no fitting images
                    lambda spec=spec: run_detector_fit_cell(spec, run, CleanSplits.of(run)),
                    about={"name": spec.name},
                )
            by_label[spec.label] = cells[key]
        return by_label

    def _blind_cells(self, run: Run) -> dict[str, Mapping[str, Any]]:
        """One ``adaptive_blind`` cell per budget: the non-adaptive PGD of the adaptive column, which no
        detector changes, crafted once and read by every detector's cell of that budget."""
        settings = self.adaptive
        shape, settings_key = tuple(run.sample.x.shape[1:]), dataclasses.asdict(settings)
        return {
            budget: run.cell(
                "adaptive_blind",
                budget,
                run.key(settings_key, eps),
                lambda eps=eps, budget=budget: run_blind_cell(settings, run, budget, eps),
                about={"budget": budget, "eps": eps},
            )
            for budget, eps in settings.budgets(shape, BOUNDS)
        }

    def _adaptive_cells(
        self,
        spec: DetectorSpec,
        run: Run,
        n_calibration: int,
        fit: Mapping[str, Any] | None,
        blind: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """One cell per budget, each scoring with the detector its fit cell saved and attacking it with
        the budget's blind examples beside its own adaptive ones."""
        settings = self.adaptive
        shape, settings_key = tuple(run.sample.x.shape[1:]), dataclasses.asdict(settings)
        for budget, eps in settings.budgets(shape, BOUNDS):
            reference = dict(blind[budget])  # read here: the cell below is submitted after it finished
            about = {"name": spec.name, "detector": spec.label, "budget": budget, "eps": eps}
            about["unbounded"] = budget.endswith("unbounded")
            run.cell(
                "adaptive",
                f"{spec.label} | {budget}",
                run.key(
                    dataclasses.asdict(spec),
                    run.config.fit_samples,
                    n_calibration,
                    settings_key,
                    eps,
                ),
                lambda about=about, reference=reference: run_adaptive_cell(
                    about, settings, run, lambda: fitted_detector(spec, run, fit), reference
                ),
                about=about,
            )


def _adaptive_samples(settings: AdaptiveSettings, run: Run) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The adaptive column's images: the first ``settings.samples`` initially correct ones (their rows in
    the sample, images and labels on the run's device)."""
    rows = np.flatnonzero(run.sample.initially_correct)[: settings.samples]
    index = torch.as_tensor(rows)
    return rows, run.sample.x[index].to(run.device), run.sample.y[index].to(run.device)


def run_blind_cell(
    settings: AdaptiveSettings, run: Run, budget: str, eps: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The non-adaptive PGD of one budget on the adaptive column's images: (the cell, its examples)."""
    rows, x, y = _adaptive_samples(settings, run)
    x_adv = blind_pgd(run.model, x, y, settings.config(eps), run.config.batch_size)
    cell = {"kind": "adaptive_blind", "label": budget, "budget": budget, "eps": eps, "status": "done"}
    return {**cell, "n": len(rows)}, {"index": rows, "x_adv": x_adv.cpu().numpy()}


def run_detector_fit_cell(
    spec: DetectorSpec, run: Run, splits: CleanSplits
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit one of our detectors on the clean splits, thresholds set: (the cell, with the adapter's
    ``saved`` config and plugin state; the state's arrays). :func:`fitted_detector` rebuilds it."""
    _, detector = _fit_for(spec, run, splits)
    arrays, saved = detector.get_state()
    cell = {
        "kind": "detector_fit",
        "label": spec.label,
        "name": spec.name,
        "status": "done",
        "n_fit": len(splits.x_fit),
        "n_calibration": len(splits.x_calibration),
        "saved": saved,
    }
    return cell, arrays


def fit_params(spec: DetectorSpec) -> dict[str, Any]:
    """The parameters of one of our detectors that its fit depends on: all but those that only move the
    threshold (the adapter's ``threshold_params``)."""
    moves_threshold = detector_registry()[spec.name].threshold_params
    return {key: value for key, value in spec.params.items() if key not in moves_threshold}


def fitted_detector(spec: DetectorSpec, run: Run, fit: Mapping[str, Any] | None) -> tuple[Detect, Any]:
    """The detector a cell scores with: ours rebuilt from its ``detector_fit`` cell (fitted once per run,
    whatever number of cells reads it) and set to ``spec``'s threshold parameters (re-calibrated from the
    fit's kept clean scores, as a fit at them would be); ART's trained peers (``fit`` None) fitted here,
    having no state format of ours. A failed fit fails the reading cell, naming it."""
    if fit is None:
        return _fit_for(spec, run, CleanSplits.of(run))
    if fit["status"] != "done":
        raise RuntimeError(f"detector_fit {fit['label']!r} failed, so this cell cannot run: {fit['error']}")
    shape = tuple(run.sample.x.shape[1:])
    classifier = art_classifier(run.model, shape, BOUNDS, None, _device_type(run.device))
    arrays = run.directory.load_arrays("detector_fit", fit["label"])
    cls = detector_registry()[spec.name]
    detector = cls.from_state(classifier, arrays, fit["saved"])
    defaults = {**cls.plugin_params, **cls.calibration_params}
    detector.set_params(**{key: spec.params.get(key, defaults[key]) for key in cls.threshold_params})
    return scoring(detector, run.config.batch_size), detector


def run_detector_cell(
    spec: DetectorSpec, run: Run, fitted: tuple[Detect, Any], attack_labels: Sequence[str]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score the clean sample and each attack's successes with one fitted detector: (cell, its arrays)."""
    sample, splits = run.sample, CleanSplits.of(run)
    detect, _ = fitted
    correct = sample.initially_correct
    clean_scores, clean_flags = detect(sample.x.numpy())
    rows = {
        "authentic errors": separation(
            clean_scores[correct], clean_scores[~correct], clean_flags[correct], clean_flags[~correct]
        )
    }
    arrays = {"clean_scores": clean_scores}
    for label in attack_labels:
        attack_arrays = run.directory.load_arrays("attack", label)
        successful = attack_arrays["successful"]
        n = len(successful)  # an attack capped at fewer samples is compared with its own clean rows
        scores, flags = (
            detect(attack_arrays["x_adv"][successful])
            if successful.any()
            else (np.zeros(0), np.zeros(0, bool))
        )
        rows[label] = separation(clean_scores[:n][correct[:n]], scores, clean_flags[:n][correct[:n]], flags)
        arrays[f"scores_{run.directory.cell_path('attack', label).stem}"] = scores
    n_fit = len(splits.x_fit)
    cell = {
        "kind": "detector",
        "label": spec.label,
        "name": spec.name,
        "params": dict(spec.params),
        "train_attack": spec.train_attack,
        "status": "done",
        "n_fit": min(spec.train_samples, n_fit) if spec.train_attack else n_fit,
        "n_calibration": None if spec.train_attack else len(splits.x_calibration),
        "clean_fpr": float(clean_flags[correct].mean()) if correct.any() else None,
        "rows": rows,
    }
    return cell, arrays


def _fit_for(spec: DetectorSpec, run: Run, splits: CleanSplits) -> tuple[Detect, Any]:
    return fit_detector_object(
        spec,
        run.model,
        splits.x_fit,
        splits.y_fit,
        x_calibration=splits.x_calibration if len(splits.x_calibration) else None,
        batch_size=run.config.batch_size,
        device=run.device,
        seed=run.config.seed,
    )


def run_adaptive_cell(
    about: Mapping[str, Any],
    settings: AdaptiveSettings,
    run: Run,
    detector: Callable[[], tuple[Detect, Any]],
    blind: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Both attacks of one (detector, budget) on the first ``settings.samples`` initially correct sample
    images, the blind one read from the budget's ``adaptive_blind`` cell: (the cell, its arrays)."""
    if blind["status"] != "done":
        raise RuntimeError(
            f"adaptive_blind {blind['label']!r} failed, so this cell cannot run: {blind['error']}"
        )
    detect, fitted = detector()
    scorer, reason = adaptive_scorer(
        fitted, f"no differentiable score: {about['name']} is trained by ART and offers no score_torch"
    )
    rows, x, y = _adaptive_samples(settings, run)
    x_blind = torch.as_tensor(run.directory.load_arrays("adaptive_blind", blind["label"])["x_adv"])
    record, arrays = adaptive_cell(
        run.model,
        detect,
        scorer,
        x,
        y,
        settings.config(about["eps"]),
        batch_size=run.config.batch_size,
        x_non_adaptive=x_blind.to(run.device),
    )
    cell = {"kind": "adaptive", "label": f"{about['detector']} | {about['budget']}", **about}
    return {**cell, "status": "done", "norm": settings.norm, "n": len(rows), "reason": reason, **record}, {
        "index": rows,
        **arrays,
    }
