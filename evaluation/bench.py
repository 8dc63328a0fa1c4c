"""``xaiadv bench``: seconds per iteration of IFGSM and of the LRP attacks, measured side by side in one run.

Same model (the VGG-style 28x28 reference CNN, random weights: speed does not depend on training), same
random batch, early stop off, each attack through the adapter of the library it is compared with:
ART's BasicIterativeMethod next to our ART adapters, torchattacks' BIM next to our torchattacks adapters.
Ratios are to the IFGSM of the same library. Each library's group runs in fresh processes (``processes``
of them, median and range reported): glibc's malloc adapts its mmap threshold to the allocation history,
so a group timed after another paid page faults the other did not, and one process's ratios differ from
the next's by up to 25%.

Also: a relevance pass with Zennit's stock rules and with ours next to a gradient step, batched relevance
vs one image at a time, and the detectors' scoring speed next to a forward pass (or a gradient step) and
their fitting time on 60,000 images; and an iteration of the detector-aware PGD against each differentiable
detector next to an IFGSM iteration.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from xaiadv.plugins.detectors import IDefender, KNNScore, LRPSignature, SpatialEntropy
from xaiadv.plugins.relevance import Relevance

from .data import DatasetNotFoundError, load_dataset
from .models import reference_cnn

STEP = 1.0 / 256.0
T = TypeVar("T")
#: References the detectors of the adaptive-attack rows are fitted on (issue 14's speed target), at most.
ADAPTIVE_REFERENCES = 10_000


@dataclass(frozen=True)
class BenchRow:
    """One measurement: seconds per iteration (or per image), and its ratio to the row's reference.

    Rows measured in several processes hold the median seconds, the median of the per-process ratios
    and those ratios' (lowest, highest) in ``ratio_range``; other rows have ``ratio_range`` None.
    """

    library: str
    name: str
    seconds: float
    reference: str
    ratio: float
    unit: str
    ratio_range: tuple[float, float] | None = None


def _interleaved_medians(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each runner, timed in turns (A, B, C, A, B, C, ...) so that drifting load on a
    shared machine hits every row alike and the ratios stay comparable."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _art_runners(
    model: nn.Module, x: np.ndarray, y: np.ndarray, iterations: int
) -> dict[str, Callable[[], object]]:
    from art.attacks.evasion import BasicIterativeMethod
    from art.estimators.classification import PyTorchClassifier

    from xaiadv.bridge import art as ours

    classifier = PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=x.shape[1:], nb_classes=10, clip_values=(0.0, 1.0)
    )
    common = {"max_iter": iterations, "early_stop": False, "batch_size": len(x)}
    attacks = {
        "IFGSM (BasicIterativeMethod)": BasicIterativeMethod(
            classifier, eps=1.0, eps_step=STEP, max_iter=iterations, batch_size=len(x), verbose=False
        ),
        "LRPFlip": ours.LRPFlip(classifier, **common),
        "LRPMean": ours.LRPMean(classifier, eps=STEP, **common),
        "LRPGrad": ours.LRPGrad(classifier, eps=STEP, **common),
        "LRPGradMean": ours.LRPGradMean(classifier, eps=STEP, **common),
    }
    return {name: (lambda attack=attack: attack.generate(x, y)) for name, attack in attacks.items()}


def _torchattacks_runners(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int
) -> dict[str, Callable[[], object]]:
    import torchattacks

    from xaiadv.bridge import torchattacks as ours

    common = {"max_iter": iterations, "early_stop": False}
    attacks = {
        "IFGSM (BIM)": torchattacks.BIM(model, eps=1.0, alpha=STEP, steps=iterations),
        "LRPFlip": ours.LRPFlip(model, **common),
        "LRPMean": ours.LRPMean(model, eps=STEP, **common),
        "LRPGrad": ours.LRPGrad(model, eps=STEP, **common),
        "LRPGradMean": ours.LRPGradMean(model, eps=STEP, **common),
    }
    return {name: (lambda attack=attack: attack(x, y)) for name, attack in attacks.items()}


def _bench_inputs(batch_size: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The seeded reference CNN (random weights) and a random batch with random labels."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = reference_cnn((1, 28, 28), 10).eval()
    x = torch.rand(batch_size, 1, 28, 28, generator=generator)
    return model, x, torch.randint(0, 10, (batch_size,), generator=generator)


def attack_rows(library: str, batch_size: int, iterations: int, repeats: int, seed: int) -> list[BenchRow]:
    """Seconds per iteration of ``library``'s IFGSM and of our adapters for that library, in this process."""
    model, x, y = _bench_inputs(batch_size, seed)
    if library == "art":
        runners = _art_runners(model, x.numpy(), y.numpy(), iterations)
    else:
        runners = _torchattacks_runners(model, x, y, iterations)
    for run in runners.values():  # warm-up: first calls pay for allocation and lazy imports
        run()
    seconds = {name: value / iterations for name, value in _interleaved_medians(runners, repeats).items()}
    return _relative(library, seconds, "s/iteration")


def _in_fresh_process(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` run in a newly spawned Python process (no state shared with this one)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _across_processes(runs: list[list[BenchRow]]) -> list[BenchRow]:
    """One row per name from the same rows measured in several processes: median seconds, median ratio
    (each ratio measured side by side within one process) and the ratios' range."""
    rows = []
    for measured in zip(*runs, strict=True):
        ratios = [row.ratio for row in measured]
        rows.append(
            replace(
                measured[0],
                seconds=statistics.median(row.seconds for row in measured),
                ratio=statistics.median(ratios),
                ratio_range=(min(ratios), max(ratios)),
            )
        )
    return rows


def _relative(library: str, seconds: dict[str, float], unit: str) -> list[BenchRow]:
    reference = next(iter(seconds))
    return [
        BenchRow(library, name, value, reference, value / seconds[reference], unit)
        for name, value in seconds.items()
    ]


def relevance_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[BenchRow]:
    """Seconds per image of one relevance pass: the whole batch at once vs one image at a time.

    Next to them, the batched forward pass alone: every relevance pass contains one, so its time per
    image is a measured floor of the batched pass, and one-at-a-time over it bounds what batching can
    gain on this machine even if the relevance backward cost nothing.
    """
    relevance = Relevance(model)
    single = x[: min(len(x), 16)]

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    seconds = _interleaved_medians(
        {
            "relevance, one image at a time": lambda: [
                relevance(single[i : i + 1], y[i : i + 1]) for i in range(len(single))
            ],
            "relevance, batched": lambda: relevance(x, y),
            "forward pass alone, batched (floor of a batched relevance pass)": forward,
        },
        repeats,
    )
    per_image = {name: len(x) for name in seconds} | {"relevance, one image at a time": len(single)}
    return _relative("xaiadv", {name: value / per_image[name] for name, value in seconds.items()}, "s/image")


def rule_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[BenchRow]:
    """Seconds per batch of one relevance pass (forward included), stock Zennit rules vs ours, next to a
    gradient step (forward + input gradient) on the same batch."""

    def gradient_step() -> torch.Tensor:
        z = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(z), y, reduction="sum")
        return torch.autograd.grad(loss, z)[0]

    stock, fast = Relevance(model, fast_rules=False), Relevance(model)
    runners = {
        "gradient step (forward + input gradient)": gradient_step,
        "relevance pass, Zennit stock rules": lambda: stock(x, y),
        "relevance pass, xaiadv fast rules": lambda: fast(x, y),
    }
    for run in runners.values():
        run()
    return _relative("zennit", _interleaved_medians(runners, repeats), "s/batch")


def _reference_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n Fashion-MNIST training images when installed, else uniform noise with random labels."""
    try:
        data = load_dataset("fashion_mnist")
    except DatasetNotFoundError:
        x = torch.rand(n, 1, 28, 28, generator=generator)
        return x, torch.randint(0, 10, (n,), generator=generator), "uniform noise"
    count = min(n, len(data.x_train))
    return torch.as_tensor(data.x_train[:count]), torch.as_tensor(data.y_train[:count]), "Fashion-MNIST"


def detector_rows(model: nn.Module, references: int, repeats: int, seed: int) -> list[BenchRow]:
    """Images per second of each detector's ``score`` at batch 256 next to the classifier's forward pass
    (kNN, I-defender, LRP signatures: one relevance pass, closed form on the last layer) or a gradient
    step (spatial entropy), and fitting time on ``references`` images next to one forward pass over them."""
    generator = torch.Generator().manual_seed(seed)
    x_ref, y_ref, source = _reference_data(references, generator)
    batch = x_ref[:256] if len(x_ref) >= 256 else torch.rand(256, 1, 28, 28, generator=generator)
    detectors = {
        "KNNScore": KNNScore(model),
        "IDefender": IDefender(model),
        "LRPSignature": LRPSignature(model),
        "SpatialEntropy": SpatialEntropy(model),
    }

    def forward_over(x: torch.Tensor) -> None:
        with torch.no_grad():
            for start in range(0, len(x), 256):
                model(x[start : start + 256])

    fit_seconds = {f"forward pass over {len(x_ref)} {source} images": _timed(lambda: forward_over(x_ref))}
    for name, detector in detectors.items():
        fit_seconds[f"{name}.fit"] = _timed(lambda detector=detector: detector.fit(x_ref, y_ref))
    batch_labels = (
        y_ref[: len(batch)] if len(y_ref) >= len(batch) else torch.zeros(len(batch), dtype=torch.long)
    )

    def gradient_step() -> None:
        z = batch.clone().requires_grad_(True)
        torch.autograd.grad(nn.functional.cross_entropy(model(z), batch_labels, reduction="sum"), z)

    forward_runners = {
        "forward pass": lambda: forward_over(batch),
        f"KNNScore.score ({len(x_ref)} references)": lambda: detectors["KNNScore"].score(batch),
        "IDefender.score": lambda: detectors["IDefender"].score(batch),
        "LRPSignature.score": lambda: detectors["LRPSignature"].score(batch),
    }
    if importlib.util.find_spec("faiss") is not None:  # the same fitted references, searched by faiss
        arrays, state = detectors["KNNScore"].get_state()
        state["config"]["backend"] = "faiss"  # from_state builds the (flat) faiss index of those references
        faiss_knn = KNNScore.from_state(model, arrays, state)
        forward_runners[f"KNNScore.score, faiss backend ({len(x_ref)} references)"] = lambda: faiss_knn.score(
            batch
        )
    forward_group = _interleaved_medians(forward_runners, repeats)
    gradient_group = _interleaved_medians(
        {
            "gradient step": gradient_step,
            "SpatialEntropy.score": lambda: detectors["SpatialEntropy"].score(batch),
        },
        repeats,
    )
    return (
        _relative("detector score", forward_group, "s/256 images")
        + _relative("detector score (gradient)", gradient_group, "s/256 images")
        + _relative("detector fit", fit_seconds, "s")
    )


def adaptive_rows(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, references: int, repeats: int, seed: int
) -> list[BenchRow]:
    """Seconds per iteration of detector-aware PGD (issue 14: at most 3x IFGSM's for I-defender and kNN at
    10,000 references) next to an IFGSM iteration, both on the batch ``x``: IFGSM's is the cross-entropy's
    input gradient and its sign step; the adaptive one :func:`~xaiadv.plugins.adaptive.loss_gradient`
    (logits, the detector's differentiable score, the margin + weighted excess loss, its gradient, which
    samples are done) and the same step. Detectors fitted on ``references`` images, one threshold at 5%
    FPR."""
    from xaiadv.plugins.adaptive import AdaptiveConfig, loss_gradient
    from xaiadv.plugins.model import Classifier

    generator = torch.Generator().manual_seed(seed)
    x_ref, y_ref, source = _reference_data(references, generator)
    classifier = Classifier.wrap(model)
    config = AdaptiveConfig()
    weight = torch.ones(len(x), dtype=torch.float64)
    detectors = {
        "IDefender": IDefender(model),
        "KNNScore (uniform, BPDA)": KNNScore(model),
        "KNNScore (distance)": KNNScore(model, weighting="distance"),
        "LRPSignature": LRPSignature(model),
    }
    for detector in detectors.values():
        detector.fit_calibrated(
            x_ref, y_ref, fpr=0.05, per_class=False
        )  # random weights: few classes predicted

    def ifgsm_iteration() -> None:
        z = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(z), y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, z)
        (x + config.eps_step * gradient.sign()).clamp(0.0, 1.0)

    def adaptive_iteration(detector: object) -> None:
        gradient, _ = loss_gradient(classifier, detector, x, y, weight, config)
        (x - config.eps_step * gradient.sign()).clamp(0.0, 1.0)

    runners: dict[str, Callable[[], object]] = {"IFGSM iteration": ifgsm_iteration}
    for name, detector in detectors.items():
        label = f"DetectorAwarePGD iteration, {name} ({len(x_ref)} {source} references)"
        runners[label] = lambda detector=detector: adaptive_iteration(detector)
    for run in runners.values():
        run()
    return _relative("adaptive attack", _interleaved_medians(runners, repeats), "s/iteration")


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def run_bench(
    batch_size: int = 128,
    iterations: int = 10,
    repeats: int = 3,
    seed: int = 0,
    references: int = 60_000,
    processes: int = 3,
) -> list[BenchRow]:
    """Measure every row in this one run and return them; nothing is read from earlier runs.

    ``references``: images the detectors are fitted on (60,000, the Fashion-MNIST training set); the
    adaptive-attack rows' detectors on the first :data:`ADAPTIVE_REFERENCES` of them (issue 14's setting).
    ``processes``: fresh processes each library's attack group is timed in. One process's ratios vary
    by up to 25% from the next's (its allocation history sets malloc's thresholds and page faults),
    more than within a process, so the rows give the median across processes and the range.
    """
    checked = (
        ("batch_size", batch_size),
        ("iterations", iterations),
        ("repeats", repeats),
        ("references", references),
        ("processes", processes),
    )
    for name, value in checked:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be an int > 0; got {value!r}")
    runs: dict[str, list[list[BenchRow]]] = {"art": [], "torchattacks": []}
    for _ in range(processes):  # libraries alternate, so drifting load reaches both alike
        for library, library_runs in runs.items():
            library_runs.append(
                _in_fresh_process(attack_rows, library, batch_size, iterations, repeats, seed)
            )
    rows = [row for library_runs in runs.values() for row in _across_processes(library_runs)]
    model, x, y = _bench_inputs(batch_size, seed)
    return (
        rows
        + rule_rows(model, x, y, repeats)
        + relevance_rows(model, x, y, repeats)
        + detector_rows(model, references, repeats, seed)
        + adaptive_rows(model, x, y, min(references, ADAPTIVE_REFERENCES), repeats, seed)
    )


# ----------------------------------------------------------------------------------------------------
# kNN references at scale (issue 15 item 2)

#: Width of the synthetic deep features, classes and mixture modes per class, and their intrinsic dimension.
KNN_DIM, KNN_CLASSES, KNN_MODES_PER_CLASS, KNN_LATENT = 256, 10, 10, 24
#: The torch backend's search chunk holds ``chunk_size * references`` float32 values (2048 x 1M = 8 GiB):
#: measured up to this many references only.
KNN_TORCH_MAX = 100_000


@dataclass(frozen=True)
class KNNScaleRow:
    """One kNN search measured through ``KNNScore.score`` in a fresh process.

    ``recall``: recall@k of the row's neighbours against the exact search's at the same size (the first
    row of that size: torch, or faiss' Flat index where torch is not measured). ``peak_mib``: the
    process's peak resident memory (``ru_maxrss``) after generating the data, fitting and scoring;
    ``base_mib``: the same before the data existed (Python, torch and faiss loaded).
    ``images_per_cpu_second``: queries over the process's CPU time (all its threads) while scoring, which
    other work on a shared machine slows less than the wall clock; ``load``: the 1-minute load average
    when the timing began (2 = both cores of this machine busy).
    """

    references: int
    search: str
    images_per_second: float
    images_per_cpu_second: float
    load: float
    recall: float
    peak_mib: float
    base_mib: float
    fit_seconds: float
    queries: int


def synthetic_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, 256) float32, labels (n,)): a seeded Gaussian mixture standing in for deep features.

    Why not uniform noise: an IVF index's recall on isotropic 256-d noise (every point about equally far
    from every other) says nothing about real features, which cluster by class and lie near a manifold of
    low intrinsic dimension (tens, not hundreds). So, in a 24-dimensional latent space: 10 class centres
    N(0, 4^2), well apart as a trained network's classes are; 10 modes per class at N(0, 1) around its
    centre, overlapping, so that a class is one lumpy cloud; each point its mode plus N(0, 1). A seeded
    random orthonormal map takes the latent space into 256 dimensions, plus N(0, 0.1^2) noise in all 256.
    Same ``n`` and ``seed``, same features.
    """
    generator = torch.Generator().manual_seed(seed)
    classes = 4.0 * torch.randn(KNN_CLASSES, KNN_LATENT, generator=generator)
    modes = classes.repeat_interleave(KNN_MODES_PER_CLASS, 0)
    modes += torch.randn(modes.shape, generator=generator)
    embedding = torch.linalg.qr(torch.randn(KNN_DIM, KNN_LATENT, generator=generator)).Q.T.contiguous()
    features = torch.empty(n, KNN_DIM)
    labels = torch.empty(n, dtype=torch.long)
    block = 65_536  # bounded temporaries at a million points
    for start in range(0, n, block):
        count = min(block, n - start)
        mode = torch.randint(0, len(modes), (count,), generator=generator)
        latent = modes[mode] + torch.randn(count, KNN_LATENT, generator=generator)
        noise = torch.randn(count, KNN_DIM, generator=generator).mul_(0.1)
        features[start : start + count] = torch.addmm(noise, latent, embedding)
        labels[start : start + count] = mode // KNN_MODES_PER_CLASS
    return features, labels


def _peak_mib() -> float:
    """The process's peak resident memory so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def knn_scale_row(
    references: int, backend: str, index: str, nprobe: int | None, queries: int, repeats: int, seed: int
) -> tuple[KNNScaleRow, np.ndarray]:
    """Fit ``KNNScore`` on ``references`` synthetic features and time ``score`` on ``queries`` others:
    (the row, recall not yet known (NaN); the queries' neighbour indices (queries, k)).

    The model is ``nn.Sequential(nn.Identity(), nn.Linear(256, 10))`` with ``layer="0"``: its feature
    layer passes the synthetic features through, so the row times the detector's own path (forward, l2
    preprocess, search, eq. 2 vote). Run it in a fresh process for a meaningful ``peak_mib``.
    """
    base = _peak_mib()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Identity(), nn.Linear(KNN_DIM, KNN_CLASSES)).eval()
    features, labels = synthetic_features(references + queries, seed)
    x_query = features[references:].clone()
    detector = KNNScore(model, layer="0", backend=backend, index=index, nprobe=nprobe)
    start = time.perf_counter()
    detector.fit(features[:references], labels[:references])
    fit_seconds = time.perf_counter() - start
    detector.score(x_query[:16])  # warm-up: lazy allocations and thread pools
    load = os.getloadavg()[0]
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        detector.score(x_query)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = _peak_mib()
    neighbours = detector.neighbours(detector.features(x_query))[1].numpy()
    search = (
        backend if backend == "torch" else f"faiss {index}" + ("" if nprobe is None else f", nprobe {nprobe}")
    )
    speeds = queries / statistics.median(wall), queries / statistics.median(cpu)
    row = KNNScaleRow(references, search, *speeds, load, math.nan, peak, base, fit_seconds, queries)
    return row, neighbours


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    """recall@k: the share of the exact k nearest neighbours (rows of ``exact``) among those ``found``."""
    hits = (found[:, :, None] == exact[:, None, :]).any(2).sum()
    return float(hits / exact.size)


def knn_scale_rows(
    sizes: tuple[int, ...] = (60_000, 1_000_000),
    *,
    ivf: str = "IVF1024,SQ8",
    nprobe: int = 10,
    queries: int = 1000,
    repeats: int = 3,
    seed: int = 0,
) -> list[KNNScaleRow]:
    """kNN scoring speed, recall@10 and peak memory at each number of references in ``sizes``, each row
    in its own fresh process: the torch backend (up to :data:`KNN_TORCH_MAX` references), faiss' exact
    Flat index and the approximate ``ivf`` index searched with ``nprobe`` inverted lists.

    Recall is against the first row of the same size (exact; torch where measured): 1.0 for every exact
    row up to ties, below 1 where the index misses a true neighbour. The default index, 1024 inverted
    lists of 8-bit scalar-quantized vectors searched in 10 of them (docs/scaling.md has the measured
    rows): 1024 lists train on 262,144 sampled references in two minutes on this shared machine (4096
    would train on all of a million, 16 times the work); the 8-bit codes are a quarter of the bytes a scan
    reads; KNNScore re-ranks the 2k + 16 candidates by their exact distances, so quantization costs recall
    only where it drops a true neighbour from them.
    """
    if not isinstance(sizes, tuple) or not sizes:
        raise ValueError(f"sizes must be a non-empty tuple of ints > 0; got {sizes!r}")
    for name, value in (
        *(("sizes", size) for size in sizes),
        ("nprobe", nprobe),
        ("queries", queries),
        ("repeats", repeats),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be an int > 0; got {value!r}")
    _check_ivf(ivf, nprobe, min(sizes))
    rows = []
    for size in sizes:
        searches = [("torch", "Flat", None)] if size <= KNN_TORCH_MAX else []
        searches += [("faiss", "Flat", None), ("faiss", ivf, nprobe)]
        measured = [
            _in_fresh_process(knn_scale_row, size, *search, queries, repeats, seed) for search in searches
        ]
        exact = measured[0][1]
        rows += [replace(row, recall=_recall(found, exact)) for row, found in measured]
    return rows


def _check_ivf(ivf: str, nprobe: int, references: int) -> None:
    """The approximate index as KNNScore will build it, checked before any row is measured (a bad factory
    string, an nprobe it has no use for, more inverted lists than references): a ValueError naming it."""
    model = nn.Sequential(nn.Identity(), nn.Linear(KNN_DIM, KNN_CLASSES))
    try:
        KNNScore(model, layer="0", backend="faiss", index=ivf, nprobe=nprobe)._new_index(KNN_DIM, references)
    except ValueError as error:
        raise ValueError(f"ivf: {error}") from None
