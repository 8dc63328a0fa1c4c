"""The retraining study (seed 001 section 3.2, Table 1; thesis section 4.3, Tables 4.3-4.4).

Seed 001 supplements the training set "with successfully attacked with FGSM images" and retrains from the
clear model's weights, one "immune" model per attack; the thesis "transfer learned [the original model] on
a training set containing the 1000 adversarial samples and 9000 original samples [...] with a reduced
learning rate". Both make the adversarial training images against the clear model first (a transferred
attack), with any registry attack, and both retrain through ART's own trainer
(``art.defences.trainer.AdversarialTrainer``): its attack is :func:`precomputed_attack`, an ART
``EvasionAttack`` on the clear model's classifier, so the trainer treats it as transferred, asks it once
for the counterpart of every training image (the adversarial image, or the image itself for the clean
rows), and with ``ratio = 1`` trains on exactly the protocol's set.

Then, per immune model: its accuracy on the clean sample, on each attack's adversarial test set made
against the clear model (transferred; "recovered": over the examples that fooled the clear model), and
the ASR of a fresh attack on it (thesis Table 4.4's ASR row); over attacks A and B, the cross table no seed
has: immune to A, attacked by B; and seed 001's Fig. 3c/3e: the immune model's LRP heatmaps of the images its
attack fooled the clear model with, beside the clear model's, with the heatmap study's numbers (Spearman,
top-k overlap) for both. Retrained models are cached like the reference models
(:func:`~xaiadv.evaluation.models.load_or_retrain`), in a folder of their own.

:func:`adversarial_examples`, :func:`retraining_set` and :func:`adversarial_retrain` are the typed library
functions; :class:`RetrainingStudy` (``xaiadv:RetrainingStudy``) runs them as resumable cells: per attack
its training images (kind ``retraining_set``), the clear model's evaluation and each immune model (kind
``immune_model``), its heatmaps beside the clear model's (kind ``retrained_heatmap``), then each fresh attack
on each immune model (kind ``reattack``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xaiadv.bridge.registry import art_classifier
from xaiadv.plugins import checks
from xaiadv.plugins.relevance import DEFAULT_COMPOSITE, check_composite

from . import attack_study
from .attack_study import Sample, predict, softmax
from .heatmap_study import NUMBERS, check_top_k, explain_attack
from .heatmaps import Heatmaps, plot_heatmaps
from .models import TRAINING_THREADS, craft_adversarial, load_or_retrain, training_threads
from .rundir import to_json
from .studies import Study, attack_labels, check_attack_labels, chosen_attacks, studies

if TYPE_CHECKING:
    from .config import RunConfig
    from .run import Run
    from .rundir import RunDirectory

#: seed 001: the fooled training images added to the clean ones; thesis 4.3: a share of the training
#: images replaced by their adversarial images, a reduced learning rate.
PROTOCOLS = ("supplement", "transfer")
#: The learning rate of each protocol when the study names none: the reference training's Adam rate, and
#: a tenth of it for the thesis's "reduced learning rate" (the thesis does not give its value).
DEFAULT_LR = {"supplement": 1e-3, "transfer": 1e-4}
#: The label of the clear model's ``immune_model`` cell (an attack may not take it).
CLEAR = "clear model"
#: The study's fields that only shape the retrained heatmaps (not part of an immune model's cell key).
HEATMAP_FIELDS = ("composite", "k", "examples")
#: The retrained heatmap figure's panels: each image, then the clear and the immune model's heatmap of it.
HEATMAP_COLUMNS = ("clean", "R clear", "R immune", "adversarial", "R clear", "R immune")
#: The two models a retrained heatmap cell explains the same images with.
MODELS = ("clear", "immune")
#: The saved example heatmaps (original class) in the order the figure's four map panels draw them.
EXAMPLE_MAPS = ("clear_clean", "immune_clean", "clear_adversarial", "immune_adversarial")
BOUNDS = (0.0, 1.0)


# -------------------------------------------------------------------------------------------------
# the library functions


def adversarial_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    params: Mapping[str, Any],
    batch_size: int = 128,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``attack`` (a registry name with ``params``) against ``model`` on raw ``x`` (N, C, H, W) with true
    labels ``y`` (N,): the adversarial images (N, C, H, W) float32 and which of them fool ``model`` where it
    classified the clean image correctly (N,) bool: seed 001's "successfully attacked" images."""
    device = device or torch.device("cpu")
    x_adv = craft_adversarial(
        model, x, y, attack=attack, params=params, bounds=BOUNDS, batch_size=batch_size, device=device
    )
    labels = y.numpy()
    clean = predict(model, x, batch_size, device).argmax(1)
    adversarial = predict(model, x_adv, batch_size, device).argmax(1)
    return x_adv.numpy(), (clean == labels) & (adversarial != labels)


def retraining_set(
    protocol: str, x: np.ndarray, y: np.ndarray, x_adv: np.ndarray, fooled: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training images, their labels and each image's counterpart for ART's trainer, by ``protocol``.

    ``x``, ``y``: the clean training images (M, C, H, W) and labels (M,); ``x_adv`` (N, C, H, W), ``fooled``
    (N,): the adversarial images of the first N <= M of them. ``"supplement"`` (seed 001): the M clean images,
    then the fooled ones again, their counterparts the adversarial images (M + n_fooled rows).
    ``"transfer"`` (thesis 4.3): the M images, the first N of them replaced by their adversarial images,
    fooled or not (N / M adversarial: the thesis's 1000 of 10000). A clean row's counterpart is itself.
    """
    checks.one_of("protocol", protocol, PROTOCOLS)
    n = len(x_adv)
    if len(fooled) != n or n > len(x) or len(y) != len(x) or x_adv.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"x_adv: expected the adversarial images (and fooled flags) of the first N <= {len(x)} images "
            f"of x, shaped like them; got x_adv {x_adv.shape}, fooled {fooled.shape}, x {x.shape}, "
            f"y {y.shape}"
        )
    if protocol == "supplement":
        rows = np.flatnonzero(fooled)
        return np.concatenate([x, x[rows]]), np.concatenate([y, y[rows]]), np.concatenate([x, x_adv[rows]])
    counterparts = x.copy()
    counterparts[:n] = x_adv
    return x.copy(), y.copy(), counterparts


@cache
def _precomputed_attack_class() -> type:
    """:func:`precomputed_attack`'s class, built on first use: ART is an optional extra."""
    from art.attacks.attack import EvasionAttack
    from art.estimators.classification import PyTorchClassifier

    class PrecomputedAttack(EvasionAttack):
        """ART's attack interface over adversarial images computed beforehand against the clear model."""

        _estimator_requirements = (PyTorchClassifier,)

        def __init__(self, classifier: PyTorchClassifier, x: np.ndarray, counterparts: np.ndarray) -> None:
            super().__init__(estimator=classifier)
            self._x, self._counterparts = x, counterparts

        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            if x.shape != self._x.shape or not np.array_equal(x, self._x):
                raise ValueError(
                    f"x: this attack holds the counterparts of {self._x.shape} training images only; "
                    f"asked for {x.shape} other images"
                )
            return self._counterparts.copy()

    return PrecomputedAttack


def precomputed_attack(classifier: Any, x: np.ndarray, counterparts: np.ndarray) -> Any:
    """An ART ``EvasionAttack`` on ``classifier`` (the clear model's) whose ``generate(x)`` returns the
    ``counterparts`` of exactly the images ``x`` (N, C, H, W) and refuses any other input."""
    if counterparts.shape != x.shape:
        raise ValueError(f"counterparts: expected one per image, shaped {x.shape}; got {counterparts.shape}")
    return _precomputed_attack_class()(classifier, x, counterparts)


def adversarial_retrain(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    counterparts: np.ndarray,
    *,
    clear: nn.Module,
    lr: float,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | None = None,
) -> nn.Module:
    """Retrain ``model`` (in place; a copy of ``clear``) with ART's ``AdversarialTrainer`` on ``x`` (N, C, H,
    W), ``y`` (N,), each image replaced by its counterpart (``ratio = 1``): Adam at ``lr`` for ``epochs``.

    The trainer's attack is :func:`precomputed_attack` on ``clear``'s classifier: a transferred attack, so
    the trainer takes every counterpart once before the first epoch. ART shuffles with numpy's and torch's
    global generators: both are seeded with ``seed`` and restored after; it trains on
    :data:`~xaiadv.evaluation.models.TRAINING_THREADS` threads (another count, other weights). Returns
    ``model`` in eval mode.
    """
    from art.defences.trainer import AdversarialTrainer
    from art.estimators.classification import PyTorchClassifier

    checks.module("model", model)
    if model is clear:
        raise ValueError("model: expected a copy of the clear model; the clear model is never retrained")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        checks.positive_int(name, value)
    checks.finite_number("lr", lr, low=0.0, low_open=True)
    device = device or torch.device("cpu")
    device_type = "gpu" if device.type == "cuda" else "cpu"
    shape = tuple(x.shape[1:])
    source = art_classifier(clear, shape, BOUNDS, None, device_type)
    trainee = PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=lr),
        input_shape=shape,
        nb_classes=source.nb_classes,
        clip_values=BOUNDS,
        device_type=device_type,
    )
    trainer = AdversarialTrainer(trainee, precomputed_attack(source, x, counterparts), ratio=1.0)
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), training_threads(TRAINING_THREADS):
            torch.manual_seed(seed)
            np.random.seed(seed)
            trainer.fit(x, y, batch_size=batch_size, nb_epochs=epochs)
    finally:
        np.random.set_state(numpy_state)
    return model.eval()


def transferred_accuracy(
    model: nn.Module,
    x_adv: np.ndarray,
    y: np.ndarray,
    fooled: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """``model``'s accuracy on adversarial images ``x_adv`` (N, C, H, W) made against another (the clear)
    model, over all N (thesis Table 4.4's X~_1 row) and over the ``fooled`` ones ("recovered")."""
    predicted = predict(model, torch.as_tensor(x_adv), batch_size, device or torch.device("cpu")).argmax(1)
    correct = predicted == y
    return {
        "n": len(y),
        "accuracy": float(correct.mean()) if len(y) else None,
        "n_fooled": int(fooled.sum()),
        "recovered": float(correct[fooled].mean()) if fooled.any() else None,
    }


def training_rows(n_train: int, clean_samples: int, seed: int) -> np.ndarray:
    """The training images a retraining uses: a seeded draw of ``clean_samples`` of ``n_train`` (the attacked
    ones are the first of them)."""
    if clean_samples > n_train:
        raise ValueError(f"clean_samples: {clean_samples} is more than the {n_train} training images")
    return np.random.default_rng(seed).permutation(n_train)[:clean_samples]


# -------------------------------------------------------------------------------------------------
# the study


@studies.register("xaiadv:RetrainingStudy")
@dataclass(frozen=True)
class RetrainingStudy(Study):
    """Seed 001 Table 1 and thesis Tables 4.3-4.4 for each attack of the run, and the cross table.

    ``protocol``: ``"supplement"`` (seed 001: the fooled ones of the ``train_samples`` attacked training
    images added to ``clean_samples`` clean ones) or ``"transfer"`` (thesis 4.3: of ``clean_samples``
    training images the first ``train_samples`` enter as their adversarial images, fooled or not);
    ``epochs``, ``lr`` (None: 1e-3 for supplement, 1e-4 for transfer), ``batch_size``: the retraining's Adam;
    ``attacks``: the labels of the run's attacks the immune models are made for and attacked with, all when
    empty. A training set smaller than ``clean_samples`` (a fallback data set) is taken whole, and then
    ``train_samples`` at most its size. ``composite``, ``k``, ``examples``: the retrained heatmaps (seed 001
    Fig. 3c/3e): the LRP composite, the top-k of the overlap, the samples drawn per immune model in the
    report's figure.
    """

    protocol: str = "supplement"
    attacks: tuple[str, ...] = ()
    train_samples: int = 1000
    clean_samples: int = 10_000
    epochs: int = 2
    lr: float | None = None
    batch_size: int = 128
    composite: str = DEFAULT_COMPOSITE
    k: int = 16
    examples: int = 3

    def __post_init__(self) -> None:
        checks.one_of("protocol", self.protocol, PROTOCOLS)
        check_composite(self.composite)
        object.__setattr__(self, "attacks", attack_labels("attacks", self.attacks))
        for name in ("train_samples", "clean_samples", "epochs", "batch_size", "k", "examples"):
            checks.positive_int(name, getattr(self, name))
        if self.train_samples > self.clean_samples:
            raise ValueError(
                f"train_samples: the attacked images are among the clean_samples ({self.clean_samples}); "
                f"got {self.train_samples}"
            )
        if self.lr is not None:
            object.__setattr__(self, "lr", checks.finite_number("lr", self.lr, low=0.0, low_open=True))

    @property
    def learning_rate(self) -> float:
        """``lr``, or the protocol's default."""
        return DEFAULT_LR[self.protocol] if self.lr is None else self.lr

    def check(self, config: RunConfig) -> None:
        check_attack_labels("attacks", self.attacks, config)
        check_top_k(self.k, config)
        if CLEAR in (spec.label for spec in config.attacks):
            raise ValueError(f"attacks: the label {CLEAR!r} names the clear model's row; rename that attack")

    def cell_count(self, config: RunConfig) -> int:
        n = len(chosen_attacks(self.attacks, config))
        return 1 + 3 * n + n * n

    def run(self, run: Run) -> None:
        labels = chosen_attacks(self.attacks, run.config)
        parameters = {
            name: value for name, value in dataclasses.asdict(self).items() if name not in HEATMAP_FIELDS
        }
        heatmap_parameters = {name: getattr(self, name) for name in HEATMAP_FIELDS}
        specs = {spec.label: spec for spec in run.config.attacks}
        test_keys = {label: run.attacks[label]["key"] for label in labels}
        sets = {}
        for label in labels:
            sets[label] = run.cell(
                "retraining_set",
                label,
                run.key(
                    "retraining_set", dataclasses.asdict(specs[label]), self.train_samples, self.clean_samples
                ),
                lambda label=label: run_set_cell(self, run, label),
                about={"name": specs[label].name, "params": dict(specs[label].params)},
            )
        run.cell(
            "immune_model",
            CLEAR,
            run.key("clear", test_keys),
            lambda: run_immune_cell(self, run, None, labels),
            about={"name": "xaiadv:RetrainingStudy"},
        )
        for label in [label for label in labels if sets[label]["status"] == "done"]:
            immune = run.cell(
                "immune_model",
                label,
                run.key(parameters, sets[label]["key"], test_keys),
                lambda label=label: run_immune_cell(self, run, label, labels),
                about={"name": "xaiadv:RetrainingStudy", "attack": specs[label].name},
            )
            if immune["status"] != "done":
                continue
            if run.attacks[label]["status"] == "done":
                run.cell(
                    "retrained_heatmap",
                    label,
                    run.key(immune["key"], run.attacks[label]["key"], heatmap_parameters),
                    lambda label=label: run_retrained_heatmap_cell(self, run, label),
                    about={"name": "xaiadv:RetrainingStudy", "attack": specs[label].name},
                )
            for attack in labels:
                run.cell(
                    "reattack",
                    reattack_label(label, attack),
                    run.key(immune["key"], dataclasses.asdict(specs[attack])),
                    lambda label=label, attack=attack: run_reattack_cell(self, run, label, specs[attack]),
                    about={"name": specs[attack].name, "immune": label, "attack": attack},
                )

    def retraining(self, run: Run, label: str, set_digest: str) -> dict[str, Any]:
        """Everything besides the clear model that determines an immune model: its cache key's parts."""
        spec = next(spec for spec in run.config.attacks if spec.label == label)
        return to_json(
            {
                "dataset": run.data.name,
                "attack": {"name": spec.name, "params": dict(spec.params)},
                "adversarial_images_sha256": set_digest,
                "protocol": self.protocol,
                "train_samples": self.train_samples,
                "clean_samples": self.clean_samples,
                "epochs": self.epochs,
                "lr": self.learning_rate,
                "batch_size": self.batch_size,
                "seed": run.config.seed,
                "threads": TRAINING_THREADS,
            }
        )


def reattack_label(immune: str, attack: str) -> str:
    """A reattack cell's label: the immune model's attack, then the fresh attack on it."""
    return f"{immune} / {attack}"


def _training_images(study: RetrainingStudy, run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The study's clean training images, all of the training set where it has fewer than ``clean_samples``
    (a config's small fallback data set: digits' 1,347); the attacked ones are the first of them."""
    n_train = len(run.data.x_train)
    rows = training_rows(n_train, min(study.clean_samples, n_train), run.config.seed)
    return run.data.x_train[rows], run.data.y_train[rows]


def run_set_cell(
    study: RetrainingStudy, run: Run, label: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One attack's adversarial training images, made against the clear model (a transferred attack)."""
    spec = next(spec for spec in run.config.attacks if spec.label == label)
    clean_x, clean_y = _training_images(study, run)
    x, y = torch.as_tensor(clean_x[: study.train_samples]), torch.as_tensor(clean_y[: study.train_samples])
    start = time.perf_counter()
    x_adv, fooled = adversarial_examples(
        run.model,
        x,
        y,
        attack=spec.name,
        params=spec.params,
        batch_size=run.config.batch_size,
        device=run.device,
    )
    correct = predict(run.model, x, run.config.batch_size, run.device).argmax(1) == y.numpy()
    record = {
        "kind": "retraining_set",
        "label": label,
        "name": spec.name,
        "params": dict(spec.params),
        "status": "done",
        "n": len(y),
        "n_clean": len(clean_y),
        "n_correct": int(correct.sum()),
        "n_fooled": int(fooled.sum()),
        "asr": float(fooled.sum() / correct.sum()) if correct.any() else None,
        "seconds_per_image": (time.perf_counter() - start) / len(y),
        "undefined": {}
        if correct.any()
        else {"asr": "the clear model classifies no training image correctly"},
    }
    return record, {"x_adv": x_adv, "fooled": fooled}


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (16 hex digits) of a cell's arrays: the adversarial images an immune model is trained on."""
    return hashlib.sha256(
        b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays))
    ).hexdigest()[:16]


def run_immune_cell(
    study: RetrainingStudy, run: Run, label: str | None, labels: Sequence[str]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The clear model (``label`` None) or the model immune to ``label``, retrained through ART's trainer
    (cached): its accuracies on the clean sample, the test set and each attack's transferred test set."""
    record: dict[str, Any] = {
        "kind": "immune_model",
        "label": CLEAR if label is None else label,
        "status": "done",
    }
    model = run.model
    if label is not None:
        model, record["training"] = _immune_model(study, run, label)
    batch_size, device = run.config.batch_size, run.device
    y = run.sample.y.numpy()
    prediction = predict(model, run.sample.x, batch_size, device).argmax(1)
    test = predict(model, torch.as_tensor(run.data.x_test), batch_size, device).argmax(1)
    record["clean_accuracy"] = float((prediction == y).mean())
    record["test_accuracy"] = float((test == run.data.y_test).mean())
    record["transferred"] = {}
    for attack in labels:
        if run.attacks[attack]["status"] != "done":
            continue
        arrays = run.directory.load_arrays("attack", attack)
        n = len(arrays["x_adv"])
        record["transferred"][attack] = transferred_accuracy(
            model, arrays["x_adv"], y[:n], arrays["successful"], batch_size=batch_size, device=device
        )
    return record, {"clean_prediction": prediction}


def _immune_model(study: RetrainingStudy, run: Run, label: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model immune to ``label`` (cached or retrained) and what its record says of its training."""
    arrays = run.directory.load_arrays("retraining_set", label)
    x, y = _training_images(study, run)
    x_train, y_train, counterparts = retraining_set(study.protocol, x, y, arrays["x_adv"], arrays["fooled"])
    retraining = study.retraining(run, label, _digest(arrays))

    def retrain(copy: nn.Module) -> nn.Module:
        return adversarial_retrain(
            copy,
            x_train,
            y_train,
            counterparts,
            clear=run.model,
            lr=study.learning_rate,
            epochs=study.epochs,
            batch_size=study.batch_size,
            seed=run.config.seed,
            device=run.device,
        )

    immune = load_or_retrain(run.model, run.results["model"]["sha256"], retraining, retrain)
    n_adversarial = int(arrays["fooled"].sum()) if study.protocol == "supplement" else len(arrays["x_adv"])
    training = {
        "protocol": study.protocol,
        "n_train": len(x_train),
        "n_adversarial": n_adversarial,
        "adversarial_share": n_adversarial / len(x_train),
        "epochs": study.epochs,
        "lr": study.learning_rate,
        "cache_key": immune.key,
        "model_file": immune.path.name,
    }
    return immune.model.to(run.device).eval(), training


def run_reattack_cell(
    study: RetrainingStudy, run: Run, label: str, spec: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A fresh attack ``spec`` on the model immune to ``label``, over the samples that model classifies
    correctly: the attack study's cell, on the immune model."""
    model, _ = _immune_model(study, run, label)
    logits = predict(model, run.sample.x, run.config.batch_size, run.device)
    sample = Sample(run.sample.x, run.sample.y, logits.argmax(1), softmax(logits))
    cell, arrays = attack_study.run_attack_cell(
        spec, model, sample, batch_size=run.config.batch_size, device=run.device
    )
    keep = ("name", "params", "n", "n_correct", "n_success", "asr", "norms", "seconds_per_image", "undefined")
    record = {
        "kind": "reattack",
        "label": reattack_label(label, spec.label),
        "immune": label,
        "attack": spec.label,
        "status": "done",
        **{key: cell[key] for key in keep},
    }
    return record, arrays


def run_retrained_heatmap_cell(
    study: RetrainingStudy, run: Run, label: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Seed 001 Fig. 3c/3e in numbers: over the samples ``label``'s attack fooled the clear model with (its
    adversarial test set, transferred to the immune model), the heatmap study's numbers
    (:func:`~xaiadv.evaluation.heatmap_study.explain_attack`: Spearman of the clean vs the adversarial
    heatmap for the original class, top-k overlap, relevance share on the perturbed values) for the clear
    and for the immune model, and a few samples' heatmaps of both for the figure."""
    model, _ = _immune_model(study, run, label)
    arrays = run.directory.load_arrays("attack", label)
    index = np.flatnonzero(arrays["successful"])
    record: dict[str, Any] = {
        "kind": "retrained_heatmap",
        "label": label,
        "attack": run.attacks[label]["name"],
        "status": "done",
        "composite": study.composite,
        "k": study.k,
        "n": len(index),
    }
    if not len(index):
        empty = {name: {"mean": None, "median": None, "n": 0} for name in NUMBERS}
        record["numbers"] = dict.fromkeys(MODELS, empty)
        reason = "the attack fooled the clear model on no sample"
        undefined = {f"{model} {name}": reason for model in MODELS for name in NUMBERS}
        return {**record, "undefined": undefined}, {}
    rows = torch.as_tensor(index)
    x, x_adv = run.sample.x[rows], torch.as_tensor(arrays["x_adv"][index])
    original, adversarial = run.sample.y[rows], torch.as_tensor(arrays["adversarial_prediction"][index])
    explanations = {
        name: explain_attack(
            explained,
            x.to(run.device),
            x_adv.to(run.device),
            original.to(run.device),
            adversarial.to(run.device),
            composite=study.composite,
            k=study.k,
            batch_size=run.config.batch_size,
        )
        for name, explained in zip(MODELS, (run.model, model), strict=True)
    }
    record["numbers"], record["undefined"] = {}, {}
    for name, explanation in explanations.items():
        record["numbers"][name], undefined = explanation.summary()
        record["undefined"].update({f"{name} {number}": reason for number, reason in undefined.items()})
    shown = slice(0, study.examples)
    names = run.data.classes
    titles = [
        f"{names[a]} -> {names[b]}"
        for a, b in zip(original[shown].tolist(), adversarial[shown].tolist(), strict=True)
    ]
    clear, immune = (explanations[name].heatmaps for name in MODELS)
    return record, {
        "index": index,
        **{f"{name}_spearman": e.numbers["spearman"] for name, e in explanations.items()},
        "example_x": x[shown].numpy(),
        "example_x_adv": x_adv[shown].numpy(),
        "example_titles": np.array(titles, dtype=np.str_),
        **{
            f"example_{name}": maps[shown].astype(np.float32)
            for name, maps in zip(
                EXAMPLE_MAPS,
                (
                    clear.clean_original,
                    immune.clean_original,
                    clear.adversarial_original,
                    immune.adversarial_original,
                ),
                strict=True,
            )
        },
    }


# -------------------------------------------------------------------------------------------------
# the report's section


def report_section(results: Mapping[str, Any], run: RunDirectory) -> str:
    """Seed 001 Table 1 / thesis Table 4.4 per immune model, the cross tables of fresh ASR and of transferred
    accuracy (immune to A, attacked by B) with a figure of both, and the retrained heatmaps (Fig. 3c/3e)."""
    from . import figures
    from .report import failed_lines, fmt, table

    sets = results.get("retraining_sets") or {}
    models = results.get("immune_models") or {}
    reattacks = results.get("reattacks") or {}
    if not sets and not models:
        return ""
    done = {label: cell for label, cell in models.items() if cell["status"] == "done"}
    immune = {label: cell for label, cell in done.items() if label != CLEAR}
    attacks = list(sets)
    lines = ["## Adversarial retraining (seed 001 Table 1; thesis 4.3, Tables 4.3-4.4)", ""]
    first = next((cell["training"] for cell in immune.values()), None)
    if first is not None:
        said = (
            "the training images each attack fooled (made against the clear model) added to the clean ones"
            if first["protocol"] == "supplement"
            else "a share of the training images replaced by their adversarial images (made against the "
            "clear model)"
        )
        lines += [
            f"Protocol {first['protocol']}: {said}; retrained from the clear model's weights through ART's "
            f"AdversarialTrainer, Adam at lr {fmt(first['lr'])} for {first['epochs']} epoch(s). Clean: "
            "accuracy on the clean sample (test: on the whole test set); transferred: on the attack's "
            "adversarial test set made against the clear model (recovered: over the examples that fooled "
            "the clear model); fresh ASR: the attack run anew on the model, over the samples it classifies "
            "correctly.",
        ]
    rows = []
    for label, cell in done.items():
        own = None if label == CLEAR else cell["transferred"].get(label, {})
        training = cell.get("training", {})
        fresh = _fresh_asr(results, reattacks, label, label) if label != CLEAR else None
        rows.append(
            [
                "clear" if label == CLEAR else f"immune to {label}",
                training.get("n_train"),
                training.get("n_adversarial"),
                cell["test_accuracy"],
                cell["clean_accuracy"],
                None if own is None else own.get("accuracy"),
                None if own is None else own.get("recovered"),
                fresh,
            ]
        )
    if rows:
        header = (
            "model",
            "n train",
            "n adversarial",
            "test acc.",
            "clean acc.",
            "transferred acc.",
            "recovered",
            "fresh ASR",
        )
        lines += ["", table(header, rows)]
    grid_rows = [CLEAR, *[label for label in attacks if label in immune]]
    asr = [[_fresh_asr(results, reattacks, row, column) for column in attacks] for row in grid_rows]
    accuracy = [
        [done.get(row, {}).get("transferred", {}).get(column, {}).get("accuracy") for column in attacks]
        for row in grid_rows
    ]
    names = ["clear" if row == CLEAR else f"immune to {row}" for row in grid_rows]
    if immune:
        lines += [
            "",
            "### Fresh ASR: immune to A (rows), attacked by B (columns)",
            "",
            table(["model", *attacks], [[name, *values] for name, values in zip(names, asr, strict=True)]),
            "",
            "### Accuracy on B's adversarial test set made against the clear model (transferred)",
            "",
            table(
                ["model", *attacks], [[name, *values] for name, values in zip(names, accuracy, strict=True)]
            ),
        ]
        path = figures.plot_value_grids(
            names,
            attacks,
            {"fresh ASR": asr, "transferred accuracy": accuracy},
            run.figures / "retraining-cross.png",
            xlabel="attacked by",
        )
        lines += ["", f"![retraining cross tables](figures/{path.name})"]
    heatmaps = results.get("retrained_heatmaps") or {}
    lines += _heatmap_lines(heatmaps, run)
    kinds = (("set", sets), ("model", models), ("reattack", reattacks), ("heatmap", heatmaps))
    lines += failed_lines({f"{kind} {label}": cell for kind, cells in kinds for label, cell in cells.items()})
    return "\n".join(lines)


def _fresh_asr(
    results: Mapping[str, Any], reattacks: Mapping[str, Any], immune: str, attack: str
) -> float | None:
    """The ASR of a fresh ``attack`` on the model immune to ``immune`` (clear model: its attack cell)."""
    cell = (
        results["attacks"].get(attack, {})
        if immune == CLEAR
        else reattacks.get(reattack_label(immune, attack), {})
    )
    return cell.get("asr") if cell.get("status") == "done" else None


def _heatmap_lines(cells: Mapping[str, Any], run: RunDirectory) -> list[str]:
    """Seed 001 Fig. 3c/3e: the clear and each immune model's heatmaps of the same clean and adversarial
    images, their numbers' table and a figure per immune model."""
    from .report import fmt, table

    done = {label: cell for label, cell in cells.items() if cell["status"] == "done"}
    if not done:
        return []
    first = next(iter(done.values()))
    lines = [
        "",
        "### Heatmaps after retraining (seed 001 Fig. 3c/3e; thesis A.1.2)",
        "",
        f"LRP heatmaps (composite {first['composite']}) for the original class of the samples each attack "
        "fooled the clear model with, of the clean image and of its adversarial example (made against the "
        "clear model), by the clear and by the immune model; mean over n. Spearman: rank correlation of "
        "the clean and the adversarial heatmap (1: the explanation survived the attack, below 0: "
        f"reversed); top-k overlap: share of the clean heatmap's k = {first['k']} most relevant values "
        "still among the adversarial one's.",
        "",
    ]
    rows = [
        [
            f"immune to {label}",
            cell["n"],
            *(cell["numbers"][model][number]["mean"] for number in NUMBERS[:2] for model in MODELS),
        ]
        for label, cell in done.items()
    ]
    header = ("model", "n", "Spearman clear", "Spearman immune", "top-k clear", "top-k immune")
    lines.append(table(header, rows))
    for label, cell in done.items():
        if not cell["n"]:
            continue
        arrays = run.load_arrays("retrained_heatmap", label)
        maps = Heatmaps(*(arrays[f"example_{name}"] for name in EXAMPLE_MAPS))
        path = plot_heatmaps(
            arrays["example_x"],
            arrays["example_x_adv"],
            maps,
            [str(title) for title in arrays["example_titles"]],
            run.figures / f"{run.cell_path('retrained_heatmap', label).stem}.png",
            columns=HEATMAP_COLUMNS,
        )
        spearman = cell["numbers"]["immune"]["spearman"]["mean"]
        lines += [
            "",
            f"#### immune to {label} (Spearman {fmt(spearman)} immune, "
            f"{fmt(cell['numbers']['clear']['spearman']['mean'])} clear)",
            "",
            f"![retrained heatmaps {label}](figures/{path.name})",
        ]
    return lines
