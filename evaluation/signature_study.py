"""The signature study (seed 001 section 3.2, Figs. 4-6): LRP signatures of clean and adversarial samples.

Seed 001 takes "LRP signatures instead of SHAP ones" (after Fidel et al., its ref. 21) "on the last layer",
reduces them to 2-D with UMAP and looks at the picture: clean samples by class (Fig. 4), and per class the
clean samples beside the adversarial examples made from them (Figs. 5-6). A signature here is
:func:`~xaiadv.plugins.signatures.lrp_signatures`: the relevance of the last layer's input for the
predicted class. A picture cannot be compared across attacks, so each attack also gets a number: the
cross-validated AUC of a classifier telling its adversarial signatures from clean ones
(:func:`~xaiadv.evaluation.separability.separability_auc`), beside the same AUC on the raw hidden state
(the last layer's input without relevance), which says whether relevance adds anything to activations.

:func:`signature_analysis` is the typed library function; :class:`SignatureStudy`
(``xaiadv:SignatureStudy``) runs it as resumable cells: one per attack (its signatures and AUCs), then
one for the joint UMAP embedding that the figures draw. UMAP comes from ``umap-learn`` (the ``explain``
extra), seeded, so the embedding is the same on every CPU run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.features import FeatureExtractor, last_layer_of_type
from xaiadv.plugins.model import Classifier
from xaiadv.plugins.signatures import lrp_signatures

from .separability import DEFAULT_FOLDS, separability_auc
from .studies import Study, attack_labels, check_attack_labels, chosen_attacks, studies

if TYPE_CHECKING:
    from .config import RunConfig
    from .run import Run

#: The two feature spaces whose separability is compared (the cells' "auc" keys).
SPACES = ("signature", "hidden")
#: UMAP's default neighbourhood, shrunk for samples smaller than it.
N_NEIGHBORS = 15
#: Classes drawn in Figs. 5-6 when the study names none: the first ones of the sample.
SHOWN_CLASSES = 3
#: The label of the embedding cell (kind "embedding").
EMBEDDING = "UMAP of LRP signatures"
EXTRA = "pip install 'xaiadv[explain]'"


@dataclass(frozen=True)
class SignatureSet:
    """Signatures (N, D) of a batch, the hidden state they explain (N, D: the last layer's input), and the
    class each signature was taken for (N,: the predicted class), all numpy, float64 / int64."""

    signatures: np.ndarray
    hidden: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)


def last_linear(model: nn.Module | Classifier, layer: str | None = None) -> str:
    """The layer a signature describes: ``layer``, by default the model's last ``nn.Linear``."""
    return last_layer_of_type(Classifier.wrap(model).module, nn.Linear) if layer is None else layer


def signature_set(
    model: nn.Module | Classifier, x: torch.Tensor, *, layer: str | None = None, batch_size: int = 256
) -> SignatureSet:
    """The LRP signatures of raw ``x`` (N, C, H, W) for the predicted class, and the hidden state beside."""
    classifier = Classifier.wrap(model)
    name = last_linear(classifier, layer)
    found = lrp_signatures(classifier, x, layer=name, batch_size=batch_size)
    extractor = FeatureExtractor(classifier.module, [name], capture="input")
    hidden = extractor(classifier.normalize(x), batch_size=batch_size)[name]
    return SignatureSet(
        found.values.detach().double().cpu().numpy(),
        hidden.reshape(found.values.shape).double().cpu().numpy(),  # (N, D) also for N = 0
        found.target.cpu().numpy().astype(np.int64),
    )


def select_per_class(y: np.ndarray, eligible: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` eligible samples of each class, in sample order."""
    checks.positive_int("per_class", per_class)
    index = np.flatnonzero(eligible)
    rank = np.zeros(len(index), dtype=np.int64)  # each sample's position among the eligible of its class
    for label in np.unique(y[index]):
        mine = y[index] == label
        rank[mine] = np.arange(mine.sum())
    return index[rank < per_class]


def separability(
    clean: SignatureSet, adversarial: SignatureSet, *, seed: int, folds: int = DEFAULT_FOLDS
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Cross-validated AUC of adversarial vs clean, on the signatures and on the hidden state; and why an
    AUC is null (each side needs ``folds`` samples)."""
    smaller = min(len(clean), len(adversarial))
    if smaller < max(folds, 2):
        reason = (
            f"{folds}-fold cross-validation needs {max(folds, 2)} samples on each side; got "
            f"{len(clean)} clean and {len(adversarial)} adversarial"
        )
        return dict.fromkeys(SPACES), dict.fromkeys(SPACES, reason)
    auc = {
        space: separability_auc(getattr(clean, space), getattr(adversarial, space), seed=seed, folds=folds)
        for space in ("signatures", "hidden")
    }
    return {"signature": auc["signatures"], "hidden": auc["hidden"]}, {}


def umap_class() -> type:
    """``umap.UMAP``; an ImportError naming the extra when umap-learn is not installed."""
    try:
        from umap import UMAP
    except ImportError as error:
        raise ImportError(
            f"the signature study's UMAP (seed 001 Figs. 4-6) needs umap-learn: {EXTRA}"
        ) from error
    return UMAP


def umap_embedding(features: np.ndarray, *, seed: int, n_neighbors: int = N_NEIGHBORS) -> np.ndarray:
    """UMAP of ``features`` (N, D) to (N, 2), seeded: the same embedding on every CPU run (one thread).

    UMAP gets the exact ``n_neighbors`` graph (scikit-learn, each point its own first neighbour, as UMAP's
    own search returns it) instead of searching an approximate one: the same graph on every machine, and on
    the demo's 4,546 signatures 6.5 s instead of 39 s (15 s instead of 76 s in a fresh process, numba's
    compilation included).
    """
    from sklearn.neighbors import NearestNeighbors

    UMAP = umap_class()
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if len(features) < 3:
        raise ValueError(f"features: UMAP needs at least 3 samples; got {len(features)}")
    neighbors = min(checks.positive_int("n_neighbors", n_neighbors), len(features) - 1)
    distances, indices = NearestNeighbors(n_neighbors=neighbors).fit(features).kneighbors(features)
    reducer = UMAP(
        n_components=2,
        n_neighbors=neighbors,
        random_state=checks.natural_int("seed", seed),
        n_jobs=1,
        precomputed_knn=(indices, distances, None),
    )
    with warnings.catch_warnings():  # what we ask for: one thread; no transform of new data later
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        return np.asarray(reducer.fit_transform(features), dtype=np.float64)


def check_classes(classes: np.ndarray) -> None:
    """Fig. 4 colours clean signatures by class: refuse a sample of one class only, naming it."""
    present = np.unique(classes)
    if len(present) < 2:
        n = len(classes)
        said = "no sample" if not n else f"class {int(present[0])} only ({n} sample{'s' * (n != 1)})"
        raise ValueError(
            f"the clean signatures hold {said}; a UMAP by class (seed 001 Fig. 4) needs at least two "
            "classes: raise the study's per_class or the run's data.samples"
        )


@dataclass(frozen=True)
class SignatureAnalysis:
    """What the study finds: the clean set and each attack's adversarial set, their AUCs (with reasons
    for the null ones), and the joint 2-D embedding (clean first, then each attack in order)."""

    clean: SignatureSet
    adversarial: dict[str, SignatureSet]
    auc: dict[str, dict[str, float | None]]
    undefined: dict[str, dict[str, str]]
    embedding: np.ndarray


def signature_analysis(
    model: nn.Module | Classifier,
    x: torch.Tensor,
    adversarial: Mapping[str, torch.Tensor],
    *,
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> SignatureAnalysis:
    """Seed 001 Figs. 4-6 with their numbers: signatures of clean ``x`` (N, C, H, W, classified correctly)
    and of each attack's adversarial examples (label -> (M, C, H, W)), separability AUCs per attack, and
    one UMAP embedding of all of them."""
    clean = signature_set(model, x, layer=layer, batch_size=batch_size)
    check_classes(clean.target)
    sets = {
        label: signature_set(model, x_adv, layer=layer, batch_size=batch_size)
        for label, x_adv in adversarial.items()
    }
    found = {label: separability(clean, signatures, seed=seed) for label, signatures in sets.items()}
    features = np.concatenate([clean.signatures, *(s.signatures for s in sets.values())])
    return SignatureAnalysis(
        clean,
        sets,
        {label: auc for label, (auc, _) in found.items()},
        {label: undefined for label, (_, undefined) in found.items()},
        umap_embedding(features, seed=seed),
    )


@studies.register("xaiadv:SignatureStudy")
@dataclass(frozen=True)
class SignatureStudy(Study):
    """Seed 001 Figs. 4-6 over the run's attacks: one cell per attack, one for the UMAP embedding.

    ``layer``: the last layer whose input the signatures describe (an ``nn.Linear``; default the model's
    last); ``per_class``: the clean samples per class (the first initially correct ones of the run's
    sample; each attack's adversarial examples are those of the same samples); ``seed``: UMAP's and the
    cross-validation folds' seed (default the run's); ``classes``: the classes drawn in Figs. 5-6 (default
    the first three of the sample); ``attacks``: the attack labels covered, all when empty.
    """

    layer: str | None = None
    per_class: int = 50
    seed: int | None = None
    classes: tuple[int, ...] = ()
    attacks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ValueError(f"layer: expected the name of the model's last layer, got {self.layer!r}")
        checks.positive_int("per_class", self.per_class)
        if self.seed is not None:
            checks.natural_int("seed", self.seed)
        classes = self.classes
        if not isinstance(classes, list | tuple) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes
        ):
            raise ValueError(f"classes: expected a list of class indices (integers >= 0), got {classes!r}")
        object.__setattr__(self, "classes", tuple(classes))
        object.__setattr__(self, "attacks", attack_labels("attacks", self.attacks))

    def check(self, config: RunConfig) -> None:
        check_attack_labels("attacks", self.attacks, config)

    def cell_count(self, config: RunConfig) -> int:
        return len(chosen_attacks(self.attacks, config)) + 1

    def run(self, run: Run) -> None:
        seed = run.config.seed if self.seed is None else self.seed
        labels = chosen_attacks(self.attacks, run.config)
        done = [label for label in labels if run.attacks[label]["status"] == "done"]
        cells = {  # all submitted before any is read: with Ray they compute side by side
            label: run.cell(
                "signature",
                label,
                run.key(self.layer, self.per_class, seed, run.attacks[label]["key"]),
                lambda label=label: run_signature_cell(self, run, label, seed),
                about={"name": "xaiadv:SignatureStudy", "attack": run.attacks[label]["name"]},
            )
            for label in done
        }
        keys = {label: cell["key"] for label, cell in cells.items() if cell["status"] == "done"}
        run.cell(
            "embedding",
            EMBEDDING,
            run.key(self.layer, self.per_class, seed, self.classes, keys),
            lambda: run_embedding_cell(self, run, list(keys), seed),
            about={"name": "xaiadv:SignatureStudy"},
        )

    def clean_index(self, run: Run) -> np.ndarray:
        """The clean samples of the study: the first ``per_class`` initially correct ones of each class."""
        sample = run.sample
        return select_per_class(sample.y.numpy(), sample.initially_correct, self.per_class)

    def clean_set(self, run: Run, index: np.ndarray) -> SignatureSet:
        x = run.sample.x[torch.as_tensor(index, dtype=torch.long)].to(run.device)
        return signature_set(run.model, x, layer=self.layer, batch_size=run.config.batch_size)


def run_signature_cell(
    study: SignatureStudy, run: Run, label: str, seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One attack's adversarial signatures (of the study's clean samples it turned) and its AUCs."""
    arrays = run.directory.load_arrays("attack", label)
    successful = arrays["successful"]
    index = study.clean_index(run)
    index = index[index < len(successful)]  # an attack capped at fewer samples: its own clean rows
    turned = index[successful[index]]
    clean = study.clean_set(run, index)
    x_adv = torch.as_tensor(arrays["x_adv"][turned]).to(run.device)
    adversarial = signature_set(run.model, x_adv, layer=study.layer, batch_size=run.config.batch_size)
    auc, undefined = separability(clean, adversarial, seed=seed)
    record = {
        "kind": "signature",
        "label": label,
        "attack": run.attacks[label]["name"],
        "status": "done",
        "layer": last_linear(run.model, study.layer),
        "width": clean.signatures.shape[1],
        "n_clean": len(clean),
        "n_adversarial": len(adversarial),
        "auc": auc,
        "undefined": undefined,
    }
    return record, {
        "index": turned,
        "original_class": run.sample.y.numpy()[turned],
        "adversarial_class": adversarial.target,
        "signatures": adversarial.signatures,
        "hidden": adversarial.hidden,
    }


def run_embedding_cell(
    study: SignatureStudy, run: Run, labels: Sequence[str], seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The joint UMAP embedding of the clean signatures and each attack's adversarial ones (Figs. 4-6)."""
    index = study.clean_index(run)
    clean_class = run.sample.y.numpy()[index]
    check_classes(clean_class)
    present = sorted({int(c) for c in clean_class})
    shown = list(study.classes) or present[:SHOWN_CLASSES]
    absent = [c for c in shown if c not in present]
    if absent:
        raise ValueError(f"classes: {absent} have no clean sample in the study; present: {present}")
    clean = study.clean_set(run, index)
    attacks = {label: run.directory.load_arrays("signature", label) for label in labels}
    features = np.concatenate([clean.signatures, *(a["signatures"] for a in attacks.values())])
    group = np.repeat(np.arange(-1, len(attacks)), [len(clean), *(len(a["index"]) for a in attacks.values())])
    original = np.concatenate([clean_class, *(a["original_class"] for a in attacks.values())])
    embedding = umap_embedding(features, seed=seed)
    record = {
        "kind": "embedding",
        "label": EMBEDDING,
        "status": "done",
        "n_clean": len(clean),
        "n_points": len(features),
        "attacks": list(attacks),
        "seed": seed,
        "n_neighbors": min(N_NEIGHBORS, len(features) - 1),
        "classes": present,
        "shown_classes": shown,
        "class_names": [run.data.classes[c] for c in present],
    }
    return record, {"embedding": embedding, "group": group, "original_class": original}
