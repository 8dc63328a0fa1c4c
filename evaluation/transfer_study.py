"""The black-box transfer study (seed 002, Zheng & Hong 2018, section 4.1, Tables 1-5).

"Attackers generated adversarial examples using model E, and used them to attack model F": a substitute
model crafts the attack, a target model is attacked and defended; the attacker knows nothing of the
target nor of its detector. Models E and F are :func:`~xaiadv.evaluation.models.model_e` and
:func:`~xaiadv.evaluation.models.model_f` (Table 1), trained on the run's data set and cached like the
reference CNN. Per attack strength (FGSM, eq. 1, at the paper's eps 0.1 .. 0.3 by default): the transfer
ASR on the target, over the samples the target classifies correctly; per detector, fitted on the
target's clean training images as the detector study fits them, its AUC telling those clean samples from
the adversarial examples that fool the target (and, beside it, from all adversarial examples of them,
failed transfers included), printed beside the paper's Table 5 I-defender row.

:func:`transfer_attack` is the typed library function; :class:`TransferStudy` (``xaiadv:TransferStudy``)
runs it as resumable cells: one per strength (kind ``transfer``), then one per detector (kind
``transfer_detector``) scoring every strength's examples with one fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xaiadv.bridge.registry import art_classifier, available_attacks, check_attack

from .attack_study import predict
from .data import class_names
from .detector_study import CleanSplits, check_detector, detector_registry, fit_detector_object, separation
from .metrics import roc_auc
from .models import TrainConfig, build_model, craft_adversarial, dataset_input_shape, load_or_train
from .studies import Study, studies

if TYPE_CHECKING:
    from .config import DetectorSpec, RunConfig
    from .run import Run
    from .rundir import RunDirectory

#: Seed 002 Table 5 (F-MNIST, FGSM crafted on model E, transferred to model F): I-defender's detection
#: AUC per eps, the row our table prints beside its own.
PAPER_TABLE_5 = {0.1: 0.9302, 0.15: 0.9587, 0.2: 0.9722, 0.25: 0.9807, 0.3: 0.9850}
#: The paper's FGSM strengths (Tables 3 and 5).
PAPER_STRENGTHS = tuple(PAPER_TABLE_5)
#: FGSM (seed 002 eq. 1) by registry name and the parameter its strength is: the attacks Table 5 applies to.
PAPER_ATTACKS = frozenset(
    {("art:FastGradientMethod", "eps"), ("torchattacks:FGSM", "eps"), ("foolbox:FGSM", "epsilons")}
)
BOUNDS = (0.0, 1.0)
#: What a :class:`Network` may output.
OUTPUTS = ("logits", "log_softmax")


@dataclass(frozen=True)
class Network:
    """One of the study's two models: a named architecture (:data:`~xaiadv.evaluation.models.ARCHITECTURES`)
    trained with Adam for ``epochs`` on ``max_train`` training images (None: all), seeded; ``width`` sizes
    the reference CNN only.

    ``output``: what the model outputs, ``"logits"`` or ``"log_softmax"``: the trained network followed by
    a ``LogSoftmax`` layer named ``log_softmax``, Table 1's "FC(10)+Softmax" in log space, a state a
    detector can model (``layer = "log_softmax"``). The same weights (not part of the cache key) and the
    same classifier: the argmax is unchanged, and log_softmax is idempotent, so a cross-entropy and its
    gradients are those of the logits.
    """

    architecture: str = "E"
    epochs: int = 5
    max_train: int | None = None
    width: int = 32
    seed: int = 0
    output: str = "logits"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output: expected one of {list(OUTPUTS)}, got {self.output!r}")

    def train_config(self, dataset: str) -> TrainConfig:
        """The cache's training config of this network on ``dataset``."""
        return TrainConfig(
            dataset=dataset,
            epochs=self.epochs,
            max_train=self.max_train,
            width=self.width,
            seed=self.seed,
            architecture=self.architecture,
        )

    def key(self, dataset: str) -> str:
        """What the study's cell keys hold of this network: its cache key, and its output when not logits
        (a detector's default layer may be the output)."""
        key = self.train_config(dataset).key()
        return key if self.output == "logits" else f"{key}+{self.output}"

    @classmethod
    def of(cls, key: str, value: object) -> Network:
        """A network from its ``[[studies]]`` table (``{ architecture = "E", epochs = 5 }``); ValueError
        naming ``key``."""
        if isinstance(value, Network):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f'{key}: expected a table such as {{ architecture = "E" }}, got {value!r}')
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"{key}: unknown keys {unknown}; valid: architecture, epochs, max_train, width, seed, output"
            )
        try:
            network = cls(**value)
            network.train_config("digits")  # TrainConfig checks every other field
        except ValueError as error:
            raise ValueError(f"{key}.{error}") from error
        return network

    def untrained(self, dataset: str) -> nn.Module:
        """A fresh model of this architecture for ``dataset``'s samples (to check parameters on)."""
        shape = dataset_input_shape(dataset)
        return self.with_output(
            build_model(self.architecture, shape, len(class_names(dataset)), width=self.width)
        )

    def with_output(self, model: nn.Module) -> nn.Module:
        """``model`` as :attr:`output` says: itself for logits, else a ``Sequential`` of its children (their
        names kept, so ``fc`` stays ``fc``) or of the model (``network``) and a ``log_softmax`` layer."""
        if self.output == "logits":
            return model
        children = list(model.named_children()) if isinstance(model, nn.Sequential) else [("network", model)]
        return nn.Sequential(OrderedDict([*children, ("log_softmax", nn.LogSoftmax(dim=1))]))


@dataclass(frozen=True)
class TransferResult:
    """One strength's black-box attack: adversarial examples (N, C, H, W) crafted on the substitute, both
    models' predictions of them (N,), and the target's clean predictions (N,)."""

    x_adv: np.ndarray
    target_clean: np.ndarray
    target_adversarial: np.ndarray
    substitute_clean: np.ndarray
    substitute_adversarial: np.ndarray

    def transferred(self, y: np.ndarray) -> np.ndarray:
        """Samples the target classified correctly and the transferred example fools (bool (N,))."""
        return (self.target_clean == y) & (self.target_adversarial != y)


def transfer_attack(
    substitute: nn.Module,
    target: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    params: Mapping[str, Any],
    batch_size: int = 128,
    device: torch.device | None = None,
) -> TransferResult:
    """Craft ``attack`` (a registry name with ``params``) on ``substitute`` from raw ``x`` (N, C, H, W) with
    true labels ``y`` (N,), and classify the examples with ``target``: seed 002's black-box setting (4.1).

    The target is only ever asked for predictions: no gradient of it reaches the attack.
    """
    device = device or torch.device("cpu")
    x_adv = craft_adversarial(
        substitute, x, y, attack=attack, params=params, bounds=BOUNDS, batch_size=batch_size, device=device
    )

    def classes(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
        return predict(model, inputs, batch_size, device).argmax(1)

    return TransferResult(
        x_adv.numpy(),
        classes(target, x),
        classes(target, x_adv),
        classes(substitute, x),
        classes(substitute, x_adv),
    )


def _strengths(values: object) -> tuple[float, ...]:
    if (
        not isinstance(values, list | tuple)
        or not values
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        or not all(math.isfinite(v) and v > 0 for v in values)
    ):
        raise ValueError(f"strengths: expected a non-empty list of finite numbers > 0, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"strengths: each value once; got {list(values)}")
    return tuple(float(v) for v in values)


def paper_auc(attack: str, strength: str, value: float) -> float | None:
    """Seed 002 Table 5's I-defender AUC for FGSM at ``value`` (None for another attack or strength)."""
    return PAPER_TABLE_5.get(value) if (attack, strength) in PAPER_ATTACKS else None


def strength_label(strength: str, value: float) -> str:
    """A transfer cell's label: ``eps=0.1``."""
    return f"{strength}={value:g}"


@studies.register("xaiadv:TransferStudy")
@dataclass(frozen=True)
class TransferStudy(Study):
    """Seed 002 Tables 1-5: attacks crafted on ``substitute`` (default model E), transferred to ``target``
    (default model F), the target defended by each of ``detectors``.

    ``substitute``, ``target``: tables of :class:`Network` (architecture, epochs, max_train, width, seed);
    ``attack``: any registry attack name, ``params`` its other parameters, ``strength`` the parameter that
    ``strengths`` sets (default FGSM's ``eps`` at the paper's 0.1 .. 0.3); ``detectors``: labels of the run's
    ``[[detectors]]``, detector registry names (with their defaults), or tables ``{ name, label, params }``
    (the run's ``[[detectors]]`` are checked against the run's model, so a parameter naming a layer of the
    target, such as I-defender's ``layer = "fc"`` of model F, goes here); all of the run's when empty.
    """

    substitute: Network = field(default_factory=lambda: Network(architecture="E"))
    target: Network = field(default_factory=lambda: Network(architecture="F"))
    attack: str = "art:FastGradientMethod"
    params: Mapping[str, Any] = field(default_factory=dict)
    strength: str = "eps"
    strengths: tuple[float, ...] = PAPER_STRENGTHS
    detectors: tuple[str | Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "substitute", Network.of("substitute", self.substitute))
        object.__setattr__(self, "target", Network.of("target", self.target))
        if self.attack not in available_attacks():
            raise ValueError(f"attack: unknown attack {self.attack!r}; `xaiadv list` names them all")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"params: expected a table of the attack's parameters, got {self.params!r}")
        object.__setattr__(self, "params", dict(self.params))
        if not isinstance(self.strength, str) or not self.strength:
            raise ValueError(f"strength: expected the name of the attack's parameter, got {self.strength!r}")
        if self.strength in self.params:
            raise ValueError(f"params: {self.strength!r} is set by strengths; leave it out of params")
        object.__setattr__(self, "strengths", _strengths(self.strengths))
        if not isinstance(self.detectors, list | tuple) or not all(
            isinstance(d, str | Mapping) for d in self.detectors
        ):
            raise ValueError(
                f"detectors: expected a list of detector labels, names or tables, got {self.detectors!r}"
            )
        object.__setattr__(self, "detectors", tuple(self.detectors))

    def check(self, config: RunConfig) -> None:
        """The attack built on an untrained substitute at each strength, every detector on an untrained
        target: a refused parameter is a config error before any training."""
        shape = dataset_input_shape(config.dataset)
        substitute = self.substitute.untrained(config.dataset)
        for value in self.strengths:
            try:
                check_attack(self.attack, self.attack_params(value), model=substitute, input_shape=shape)
            except ValueError as error:
                raise ValueError(f"params: {error}") from error
        classifier = art_classifier(self.target.untrained(config.dataset), shape, BOUNDS, None)
        for spec in self.detector_specs(config):
            try:
                check_detector(spec, classifier)
            except ValueError as error:
                raise ValueError(f"detectors: {spec.label}: {error}") from error

    def attack_params(self, value: float) -> dict[str, Any]:
        """The attack's parameters at strength ``value``."""
        return {**self.params, self.strength: value}

    def detector_specs(self, config: RunConfig) -> list[DetectorSpec]:
        """The detectors the study fits: the run's by label or a registry name's defaults; all of the
        run's when ``detectors`` is empty."""
        from .config import DetectorSpec

        if not self.detectors:
            if not config.detectors:
                raise ValueError(
                    "detectors: the run has no [[detectors]]; name one here (e.g. "
                    '"xaiadv:IDefenderDetector") or add a [[detectors]] entry'
                )
            return list(config.detectors)
        by_label = {spec.label: spec for spec in config.detectors}
        registry = detector_registry()
        named = [d for d in self.detectors if isinstance(d, str)]
        unknown = [d for d in named if d not in by_label and d not in registry]
        if unknown:
            raise ValueError(
                f"detectors: {unknown} are neither labels of this run's [[detectors]] "
                f"({', '.join(by_label) or 'none'}) nor detector names (`xaiadv list`)"
            )
        specs = []
        for index, entry in enumerate(self.detectors):
            if isinstance(entry, str):
                specs.append(by_label[entry] if entry in by_label else DetectorSpec(name=entry))
                continue
            try:
                specs.append(DetectorSpec(**entry))
            except (TypeError, ValueError) as error:
                raise ValueError(f"detectors[{index}]: {error}") from error
        labels = [spec.label for spec in specs]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"detectors: labels must be unique; repeated: {repeated}")
        return specs

    def cell_count(self, config: RunConfig) -> int:
        return len(self.strengths) + len(self.detector_specs(config))

    def run(self, run: Run) -> None:
        dataset = run.data.name
        models = (self.substitute.key(dataset), self.target.key(dataset))
        cells = {  # all submitted before any is read: with Ray they compute side by side
            strength_label(self.strength, value): run.cell(
                "transfer",
                strength_label(self.strength, value),
                run.key(models, self.attack, self.attack_params(value)),
                lambda value=value: run_transfer_cell(self, run, value),
                about={"name": self.attack, "params": self.attack_params(value)},
            )
            for value in self.strengths
        }
        keys = {label: cell["key"] for label, cell in cells.items() if cell["status"] == "done"}
        splits = CleanSplits.of(run)
        for spec in self.detector_specs(run.config):
            run.cell(
                "transfer_detector",
                spec.label,
                run.key(
                    dataclasses.asdict(spec), models[1], len(splits.x_fit), len(splits.x_calibration), keys
                ),
                lambda spec=spec: run_transfer_detector_cell(
                    self, run, spec, CleanSplits.of(run), list(keys)
                ),
                about={"name": spec.name},
            )

    def network(self, run: Run, which: str) -> tuple[nn.Module, float]:
        """The substitute or target trained on the run's data (from the cache), on the run's device, and its
        test accuracy."""
        network = getattr(self, which)
        trained = load_or_train(network.train_config(run.data.name), device=run.device)
        return network.with_output(trained.model).to(run.device).eval(), trained.test_accuracy


def run_transfer_cell(
    study: TransferStudy, run: Run, value: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One strength: the examples crafted on the substitute, the target's ASR over its correct samples."""
    substitute, substitute_accuracy = study.network(run, "substitute")
    target, target_accuracy = study.network(run, "target")
    x, y = run.sample.x, run.sample.y
    found = transfer_attack(
        substitute,
        target,
        x,
        y,
        attack=study.attack,
        params=study.attack_params(value),
        batch_size=run.config.batch_size,
        device=run.device,
    )
    labels = y.numpy()
    correct = found.target_clean == labels
    transferred = found.transferred(labels)
    substitute_correct = found.substitute_clean == labels
    record = {
        "kind": "transfer",
        "label": strength_label(study.strength, value),
        "status": "done",
        "attack": study.attack,
        "strength": study.strength,
        "value": value,
        "substitute": study.substitute.architecture,
        "target": study.target.architecture,
        "target_output": study.target.output,
        "substitute_test_accuracy": substitute_accuracy,
        "target_test_accuracy": target_accuracy,
        "n": len(labels),
        "n_target_correct": int(correct.sum()),
        "n_transferred": int(transferred.sum()),
        "asr": float(transferred.sum() / correct.sum()) if correct.any() else None,
        "substitute_asr": (
            float(
                (substitute_correct & (found.substitute_adversarial != labels)).sum()
                / substitute_correct.sum()
            )
            if substitute_correct.any()
            else None
        ),
        "paper_auc": paper_auc(study.attack, study.strength, value),
    }
    undefined = {}
    if not correct.any():
        undefined["asr"] = "the target classifies no sample correctly"
    if not substitute_correct.any():
        undefined["substitute_asr"] = "the substitute classifies no sample correctly"
    if record["paper_auc"] is None:
        undefined["paper_auc"] = "seed 002 Table 5 has FGSM (L-inf) at eps 0.1, 0.15, 0.2, 0.25, 0.3 only"
    arrays = {
        "x_adv": found.x_adv,
        "target_clean": found.target_clean,
        "target_adversarial": found.target_adversarial,
        "substitute_adversarial": found.substitute_adversarial,
        "transferred": transferred,
    }
    return {**record, "undefined": undefined}, arrays


def run_transfer_detector_cell(
    study: TransferStudy, run: Run, spec: DetectorSpec, splits: CleanSplits, labels: Sequence[str]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One detector fitted on the target's clean training images, scored on the target-correct clean
    samples and on each strength's examples: AUC over the transferred ones and over all of them."""
    target, _ = study.network(run, "target")
    detect, detector = fit_detector_object(
        spec,
        target,
        splits.x_fit,
        splits.y_fit,
        x_calibration=splits.x_calibration if len(splits.x_calibration) else None,
        batch_size=run.config.batch_size,
        device=run.device,
        seed=run.config.seed,
    )
    y = run.sample.y.numpy()
    correct = predict(target, run.sample.x, run.config.batch_size, run.device).argmax(1) == y
    clean_scores, clean_flags = detect(run.sample.x.numpy())
    clean_true = true_class_scores(detector, run.sample.x.numpy(), y, run.config.batch_size)
    rows, arrays = {}, {"clean_scores": clean_scores}
    for label in labels:
        cell = run.directory.load_arrays("transfer", label)
        scores, flags = detect(cell["x_adv"])
        transferred = cell["transferred"]
        row = separation(clean_scores[correct], scores[transferred], clean_flags[correct], flags[transferred])
        row["n_all"] = int(correct.sum())
        row["auc_all"] = roc_auc(clean_scores[correct], scores[correct]) if correct.any() else None
        if not correct.any() or not transferred.any():
            row["reason"] = "no transferred example" if correct.any() else "no target-correct sample"
        stem = run.directory.cell_path("transfer", label).stem
        arrays[f"scores_{stem}"] = scores
        if clean_true is not None:
            true = true_class_scores(detector, cell["x_adv"], y, run.config.batch_size)
            row.update(_true_class_aucs(clean_true[correct], true[correct], transferred[correct]))
            arrays[f"true_class_scores_{stem}"] = true
        rows[label] = row
    if clean_true is not None:
        arrays["clean_true_class_scores"] = clean_true
    record = {
        "kind": "transfer_detector",
        "label": spec.label,
        "name": spec.name,
        "params": dict(spec.params),
        "status": "done",
        "target": study.target.architecture,
        "n_fit": len(splits.x_fit),
        "n_target_correct": int(correct.sum()),
        "clean_fpr": float(clean_flags[correct].mean()) if correct.any() else None,
        "true_class": clean_true is not None,
        "rows": rows,
    }
    return record, arrays


def true_class_scores(detector: object, x: np.ndarray, y: np.ndarray, batch_size: int) -> np.ndarray | None:
    """-log p(h(x_i) | y_i) (N,): a per-class density detector (I-defender, LRP signatures) scoring each
    sample under its TRUE class's mixture, not its predicted one; None for a detector without per-class
    likelihoods (``log_likelihood``) of ours.

    Seed 002 writes eq. 4 for "an input x in the c-th class" and eq. 5 as Reject(x, c) without saying, for
    a test input, whether c is its label or its prediction. Deployed, only the prediction exists (our
    detectors' score); an evaluation knows the label. The study reports both, this one as a reading no
    deployed detector can use. On model F's output a fooled example's state, heading for another class, is
    unlikely under its own class's mixture (AUC up, the reading Table 5's figures match); on a hidden state
    before the last layer it can stay close to it (on the digits CNN of the tests the AUC goes down).
    """
    plugin = getattr(detector, "plugin_", None)
    if not callable(getattr(plugin, "log_likelihood", None)):
        return None
    plugin.batch_size = batch_size
    with torch.no_grad():
        log_likelihood = plugin.log_likelihood(torch.as_tensor(x, device=plugin.classifier.device))
    return -log_likelihood.cpu().numpy()[np.arange(len(y)), y]


def _true_class_aucs(clean: np.ndarray, adversarial: np.ndarray, transferred: np.ndarray) -> dict[str, Any]:
    """True-class scores' AUCs over the target-correct samples: ``clean`` and ``adversarial`` scores of the
    same samples, ``transferred`` which examples fool the target; clean against the transferred examples
    (``auc_true_class``) and against every example (``auc_all_true_class``)."""
    if not len(clean):
        return {"auc_true_class": None, "auc_all_true_class": None}
    return {
        "auc_true_class": roc_auc(clean, adversarial[transferred]) if transferred.any() else None,
        "auc_all_true_class": roc_auc(clean, adversarial),
    }


# -------------------------------------------------------------------------------------------------
# the report's section


def report_section(results: Mapping[str, Any], run: RunDirectory) -> str:
    """Seed 002 Table 5 beside ours: per strength the transfer ASR and each detector's AUC, the paper's
    I-defender AUC and our gap to it; the same scored under the true class for the detectors with per-class
    likelihoods; one ROC figure per detector over the strengths."""
    from . import figures
    from .report import failed_lines, fmt

    cells = results.get("transfers") or {}
    detectors = results.get("transfer_detectors") or {}
    if not cells and not detectors:
        return ""
    done = {label: cell for label, cell in cells.items() if cell["status"] == "done"}
    fitted = {label: cell for label, cell in detectors.items() if cell["status"] == "done"}
    lines = ["## Black-box transfer (seed 002 section 4.1, Tables 1-5)", ""]
    if done:
        first = next(iter(done.values()))
        lines += [
            f"{first['attack']} crafted on the substitute (model {first['substitute']}, test accuracy "
            f"{fmt(first['substitute_test_accuracy'])}) and transferred to the target (model "
            f"{first['target']}, test accuracy {fmt(first['target_test_accuracy'])}); the target never gives "
            "the attack a gradient. Transfer ASR: share of the target-correct samples whose example fools "
            "the target (substitute ASR: the same on the substitute itself). AUC: the detector, fitted on "
            "the target's clean training images, telling the target-correct clean samples from the "
            "transferred examples (all: from every example of those samples, failed transfers included). "
            "Paper: seed 002 Table 5, I-defender (F-MNIST, FGSM from model E to model F).",
        ]
    header = ["strength", "n target-correct", "n transferred", "transfer ASR", "substitute ASR"]
    rows = [
        [label, cell["n_target_correct"], cell["n_transferred"], cell["asr"], cell["substitute_asr"]]
        for label, cell in done.items()
    ]
    if rows:
        lines += ["", _auc_table(header, rows, done, fitted, ("auc", "auc_all"))]
        lines += _gap_lines(done, fitted, ("auc", "auc_all"), "")
    conditioned = {label: cell for label, cell in fitted.items() if cell.get("true_class")}
    if done and conditioned:
        lines += [
            "",
            "Scored under the TRUE class's mixture instead of the predicted one (eq. 4 read with c the "
            "sample's label): an evaluation knows the label, a deployed detector does not, so no deployed "
            "detector gets these figures; printed because the paper does not say which class it scores "
            "under.",
            "",
            _auc_table(["strength"], [[label] for label in done], done, conditioned, _TRUE_CLASS_COLUMNS),
        ]
        lines += _gap_lines(done, conditioned, _TRUE_CLASS_COLUMNS, " (true class)")
    for label, detector in fitted.items():
        rocs = {
            strength: {"fpr": row["roc"]["fpr"], "tpr": row["roc"]["tpr"], "auc": row["auc"]}
            for strength, row in detector["rows"].items()
            if row.get("roc")
        }
        if rocs:
            stem = run.cell_path("transfer_detector", label).stem
            path = figures.plot_roc(rocs, run.figures / f"roc-{stem}.png", title=f"{label} (transfer)")
            lines += ["", f"![ROC {label}](figures/{path.name})"]
    lines += failed_lines({**cells, **detectors})
    return "\n".join(lines)


_TRUE_CLASS_COLUMNS = ("auc_true_class", "auc_all_true_class")
_COLUMN_NAMES = {"auc": "AUC", "auc_all": "AUC all", "auc_true_class": "AUC", "auc_all_true_class": "AUC all"}


def _auc_table(
    header: list[str],
    rows: list[list[object]],
    done: Mapping[str, Any],
    fitted: Mapping[str, Any],
    columns: Sequence[str],
) -> str:
    """``rows`` (one per finished strength, in ``done``'s order) extended by each detector's ``columns``
    and the paper's AUC."""
    from .report import table

    header = [*header, *(f"{_COLUMN_NAMES[c]} {label}" for label in fitted for c in columns)]
    header.append("paper I-defender AUC (Table 5)")
    extended = []
    for row, (strength, cell) in zip(rows, done.items(), strict=True):
        found = [detector["rows"].get(strength, {}).get(c) for detector in fitted.values() for c in columns]
        paper = cell["paper_auc"]
        extended.append([*row, *found, "n/a" if paper is None else f"{paper:.4f}"])  # as Table 5 prints it
    return table(header, extended)


def _gap_lines(
    done: Mapping[str, Any], fitted: Mapping[str, Any], columns: Sequence[str], reading: str
) -> list[str]:
    """Per detector, the largest gap (ours - paper) of each of ``columns`` over the paper's strengths."""
    lines = []
    for label, detector in fitted.items():
        parts = []
        for column in columns:
            gaps = [
                detector["rows"][strength][column] - cell["paper_auc"]
                for strength, cell in done.items()
                if cell["paper_auc"] is not None
                and detector["rows"].get(strength, {}).get(column) is not None
            ]
            if gaps:
                parts.append(f"{_COLUMN_NAMES[column]} {max(gaps, key=abs):+.4f}")
        if parts:
            lines += [
                "",
                f"{label}{reading}: largest gap to the paper's I-defender AUC (ours - paper): "
                + ", ".join(parts)
                + ".",
            ]
    return lines
