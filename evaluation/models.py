"""Reference CNNs, their seeded training, and a safetensors cache of trained models.

The attacks of the thesis (seeds/004, section 3.1.3, Fig. 3.5) target small plain CNNs: blocks of
two 3x3 convolutions with ReLU and a 2x2 max-pool, then two dense layers. :func:`reference_cnn`
builds that shape (for MNIST it has exactly the thesis's 467,818 parameters) from ``nn.ReLU``
modules, without BatchNorm or dropout, so Zennit's LRP rules apply layer by layer.

Trained models are cached as ``<cache>/models/<dataset>-<key>.safetensors`` plus a JSON manifest
holding the configuration, test accuracy and the weights' sha256; nothing is ever pickled, and
every write is atomic.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from xaiadv.evaluation.data import DATASETS, Dataset, class_names, load_dataset
from xaiadv.plugins.storage import atomic_write

if TYPE_CHECKING:
    from .config import ModelSpec

__all__ = [
    "SCHEMA_VERSION",
    "TRAINING_THREADS",
    "LoadedModel",
    "RetrainedModel",
    "TrainConfig",
    "TrainedModel",
    "build_model",
    "craft_adversarial",
    "dataset_input_shape",
    "default_cache_dir",
    "import_factory",
    "load_model",
    "load_or_retrain",
    "load_or_train",
    "load_run_model",
    "model_e",
    "model_f",
    "reference_cnn",
    "save_model",
    "train_reference_model",
    "training_threads",
    "untrained_reference",
]

logger = logging.getLogger(__name__)

#: Version of the manifest format written by :func:`save_model`; newer ones are refused on load.
SCHEMA_VERSION = 1
ENV_CACHE = "XAIADV_CACHE"
_EVAL_BATCH = 1024


# --------------------------------------------------------------------------------------------------
# Architecture


def reference_cnn(input_shape: tuple[int, int, int], num_classes: int, *, width: int = 32) -> nn.Sequential:
    """Plain CNN in the spirit of the thesis's Fig. 3.5; outputs logits.

    Blocks of ``Conv3x3 -> ReLU -> Conv3x3 -> ReLU -> MaxPool2d(2)`` (``width`` then ``2 * width``
    channels): two blocks for inputs of 16 pixels or more a side (28x28, 32x32), one for 8x8 digits.
    Then ``Flatten -> Linear(4 * width) -> ReLU -> Linear(num_classes)``. Input ``(N, C, H, W)``.
    Weights get He (Kaiming) uniform initialisation for ReLU and zero biases: with torch's default
    init the small digits set does not reach 90% test accuracy in three epochs.
    """
    c, h, w = _check_input_shape(input_shape)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("width", width)
    n_blocks = 2 if min(h, w) >= 16 else 1
    layers: list[nn.Module] = []
    channels = c
    for block in range(n_blocks):
        out = width * 2**block
        layers += [
            nn.Conv2d(channels, out, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(out, out, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, h, w = out, h // 2, w // 2
    layers += [
        nn.Flatten(),
        nn.Linear(channels * h * w, 4 * width),
        nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    ]
    model = nn.Sequential(*layers)
    _he_init(model)
    return model


def _he_init(model: nn.Module) -> None:
    """He et al. (2015) uniform init of every conv and linear weight, zero biases; uses torch's global RNG."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def model_e(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Zheng & Hong 2018 (seed 002) Table 1, model E: ``FC(200) - ReLU - FC(200) - ReLU - FC(num_classes)``.

    The black-box substitute of section 4.1 (after Defense-GAN's, their ref. 27). It outputs logits: the
    table's softmax is the loss's. Layers ``flatten, fc1, relu1, fc2, relu2, fc3``; He init as
    :func:`reference_cnn`.
    """
    c, h, w = _check_input_shape(input_shape)
    _check_positive_int("num_classes", num_classes)
    model = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(c * h * w, 200),
            relu1=nn.ReLU(),
            fc2=nn.Linear(200, 200),
            relu2=nn.ReLU(),
            fc3=nn.Linear(200, num_classes),
        )
    )
    _he_init(model)
    return model


def model_f(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Zheng & Hong 2018 (seed 002) Table 1, model F: ``Conv(64, 8x8, 2) - ReLU - Conv(128, 6x6, 2) - ReLU -
    FC(num_classes)``, the black-box target of section 4.1; outputs logits.

    The table gives no padding: the first convolution pads "same" (3 pixels, 28 -> 14), the second none
    (14 -> 5), as in cleverhans' basic CNN whose first two layers these are (Defense-GAN's code builds its
    models with cleverhans). Layers ``conv1, relu1, conv2, relu2, flatten, fc``; needs inputs of 11 pixels
    or more a side (the second convolution's 6x6 window on the first's output).
    """
    c, h, w = _check_input_shape(input_shape)
    _check_positive_int("num_classes", num_classes)
    if min(h, w) < 11:
        raise ValueError(
            f"input_shape: model F needs H, W >= 11 (its 8x8/2 and 6x6/2 convolutions); got {input_shape!r}"
        )
    side = [((n + 1) // 2 - 6) // 2 + 1 for n in (h, w)]
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(c, 64, kernel_size=8, stride=2, padding=3),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(64, 128, kernel_size=6, stride=2),
            relu2=nn.ReLU(),
            flatten=nn.Flatten(),
            fc=nn.Linear(128 * side[0] * side[1], num_classes),
        )
    )
    _he_init(model)
    return model


#: The named architectures a :class:`TrainConfig` can train and the cache can hold.
ARCHITECTURES = ("reference_cnn", "E", "F")


def build_model(
    architecture: str, input_shape: tuple[int, int, int], num_classes: int, *, width: int
) -> nn.Sequential:
    """A fresh model of a named architecture (:data:`ARCHITECTURES`); ``width`` sizes the reference CNN only
    (models E and F have the paper's fixed sizes)."""
    if architecture == "reference_cnn":
        return reference_cnn(input_shape, num_classes, width=width)
    if architecture == "E":
        return model_e(input_shape, num_classes)
    if architecture == "F":
        return model_f(input_shape, num_classes)
    raise ValueError(f"architecture: expected one of {', '.join(ARCHITECTURES)}, got {architecture!r}")


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    """``(C, H, W)`` of positive ints with H, W >= 2 (one max-pool needs two pixels)."""
    if (
        not isinstance(input_shape, tuple | list)
        or len(input_shape) != 3
        or not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in input_shape)
        or input_shape[0] < 1
        or min(input_shape[1:]) < 2
    ):
        raise ValueError(f"input_shape: expected (C, H, W) with C >= 1 and H, W >= 2, got {input_shape!r}")
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


def _check_positive_int(field: str, value: object) -> None:
    """ValueError naming ``field`` unless ``value`` is an int >= 1 (bools excluded)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field}: expected an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Configuration and result


#: Intra-op threads every training here runs on (:class:`TrainConfig`'s ``threads``, the retraining study's).
#: Float sums in another order give other weights: the demo's model trained on 1 thread (a Ray worker runs
#: with OMP_NUM_THREADS=1) reaches test accuracy 0.8862, on 2 threads 0.8878, each reproducibly. So the count
#: is fixed, not torch's default, and is part of a model's key: the same config gives the same weights under
#: either executor, on any core count (the same torch build and CPU kind).
TRAINING_THREADS = 2


@contextmanager
def training_threads(threads: int) -> Iterator[None]:
    """Run the block on ``threads`` threads (``torch.set_num_threads``); restored after, on error too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained reference model; its :meth:`key` names the cache file.

    ``max_train`` keeps a seeded random subset of that many training samples (None: all of them);
    ``threads``: the threads training runs on (:data:`TRAINING_THREADS`; other counts, other weights).
    """

    dataset: str = "fashion_mnist"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    width: int = 32
    seed: int = 0
    max_train: int | None = None
    architecture: str = "reference_cnn"
    threads: int = TRAINING_THREADS

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture: expected one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}")
        for field in ("epochs", "batch_size", "width", "threads"):
            _check_positive_int(field, getattr(self, field))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if self.max_train is not None:
            _check_positive_int("max_train", self.max_train)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        object.__setattr__(self, "lr", float(lr))  # 1 and 1.0 are the same config, with one key

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Short stable hash of the configuration: sha256 of its sorted JSON, 12 hex digits.

        The reference CNN's key leaves ``architecture`` out, so models cached before there were named
        architectures keep their keys.
        """
        fields = self.to_dict()
        if fields["architecture"] == "reference_cnn":
            del fields["architecture"]
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TrainedModel:
    """A trained reference model in eval mode, its configuration and test accuracy.

    ``path`` is the ``.safetensors`` file it was saved to or loaded from, None if never saved.
    """

    model: nn.Module
    config: TrainConfig
    test_accuracy: float
    path: Path | None


# --------------------------------------------------------------------------------------------------
# Training


def train_reference_model(
    data: Dataset,
    config: TrainConfig,
    *,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> TrainedModel:
    """Train :func:`reference_cnn` on ``data`` with Adam and cross-entropy; seeded and reproducible.

    The seed fixes the initial weights (``torch.manual_seed`` inside ``fork_rng``, so the caller's
    global RNG is left as it was), the training subset and the batch order (a private
    ``torch.Generator``), and ``config.threads`` the order of the float sums: the same config gives the
    same weights on CPU, whatever thread count the caller's process has.
    ``device`` defaults to CPU; the returned model is on CPU, in eval mode.
    """
    if data.name != config.dataset:
        raise ValueError(f"config.dataset: {config.dataset!r} does not match the data given ({data.name!r})")
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(config.seed)
        model = build_model(config.architecture, data.input_shape, len(data.classes), width=config.width)
        model = model.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    x, y = _training_subset(data, config.max_train, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    n_batches = math.ceil(len(x) / config.batch_size)
    model.train()
    with (
        training_threads(config.threads),
        tqdm(total=config.epochs * n_batches, disable=not progress, desc=f"train {data.name}") as bar,
    ):
        for epoch in range(config.epochs):
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for idx in order.split(config.batch_size):
                xb, yb = x[idx].to(device), y[idx].to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                bar.update()
            logger.info("%s epoch %d/%d: loss %.4f", data.name, epoch + 1, config.epochs, total / len(x))
    model = model.cpu().eval()
    accuracy = _accuracy(model, data.x_test, data.y_test)
    logger.info("%s: test accuracy %.4f (config %s)", data.name, accuracy, config.key())
    return TrainedModel(model=model, config=config, test_accuracy=accuracy, path=None)


def _training_subset(
    data: Dataset, max_train: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training tensors (copies), reduced to a seeded random subset of ``max_train`` samples."""
    x = torch.tensor(data.x_train)
    y = torch.tensor(data.y_train)
    if max_train is not None and max_train < len(x):
        keep = torch.randperm(len(x), generator=generator)[:max_train]
        x, y = x[keep], y[keep]
    return x, y


@torch.inference_mode()
def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` that ``model`` (on CPU, eval mode) classifies as ``y``."""
    if len(x) == 0:
        return float("nan")
    correct = 0
    for start in range(0, len(x), _EVAL_BATCH):
        xb = torch.tensor(x[start : start + _EVAL_BATCH])
        pred = model(xb).argmax(dim=1).numpy()
        correct += int((pred == y[start : start + _EVAL_BATCH]).sum())
    return correct / len(x)


# --------------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``$XAIADV_CACHE`` when set, else ``~/.cache/xaiadv``."""
    env = os.environ.get(ENV_CACHE, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xaiadv"


def load_or_train(
    config: TrainConfig,
    *,
    cache_dir: Path | None = None,
    data_root: str | os.PathLike[str] | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> TrainedModel:
    """The model for ``config`` from the cache, or trained, saved and returned when not cached.

    A cache entry exists once its JSON manifest is written (the last step of :func:`save_model`);
    a damaged entry raises ValueError rather than being silently retrained over.
    """
    stem = (cache_dir if cache_dir is not None else default_cache_dir()) / "models" / _stem_name(config)
    if _manifest_path(stem).exists():
        trained = load_model(stem)
        if trained.config != config:
            raise ValueError(
                f"{_manifest_path(stem)}: holds config {trained.config}, not the requested {config}; "
                "delete it and its .safetensors file and train again"
            )
        logger.info("loaded cached model %s (test accuracy %.4f)", trained.path, trained.test_accuracy)
        return trained
    data = load_dataset(config.dataset, data_root)
    trained = train_reference_model(data, config, progress=progress, device=device)
    path = save_model(stem, trained.model, config, trained.test_accuracy, input_shape=data.input_shape)
    return dataclasses.replace(trained, path=path)


def _stem_name(config: TrainConfig) -> str:
    """Cache file name without suffix: ``<dataset>-<key>``."""
    return f"{config.dataset}-{config.key()}"


def _weights_path(stem: Path) -> Path:
    return stem.parent / f"{stem.name}.safetensors"


def _manifest_path(stem: Path) -> Path:
    return stem.parent / f"{stem.name}.json"


def save_model(
    path_stem: Path,
    model: nn.Module,
    config: TrainConfig,
    test_accuracy: float,
    *,
    input_shape: tuple[int, int, int] | None = None,
) -> Path:
    """Write ``<stem>.safetensors`` and the ``<stem>.json`` manifest atomically; return the weights path.

    ``model`` must be a :func:`reference_cnn` built with ``config.width``. ``input_shape`` defaults
    to the shape of ``config.dataset``'s samples. The manifest is written last, so a crash never
    leaves a manifest pointing at missing or partial weights.
    """
    shape = _check_input_shape(
        input_shape if input_shape is not None else dataset_input_shape(config.dataset)
    )
    num_classes = _num_classes(model)
    _check_architecture(model, shape, num_classes, config, where="model")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    blob = safetensors.torch.save(tensors)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = _weights_path(stem)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "architecture": f"xaiadv.{config.architecture}",
        "config": config.to_dict(),
        "config_key": config.key(),
        "test_accuracy": float(test_accuracy),
        "input_shape": list(shape),
        "num_classes": num_classes,
        "weights_file": weights.name,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    atomic_write(weights, blob)
    atomic_write(_manifest_path(stem), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    logger.info("saved model to %s", weights)
    return weights


def untrained_reference(dataset: str, width: int) -> nn.Sequential:
    """The reference CNN for ``dataset``'s samples and classes, freshly initialised (e.g. to check layer
    names and parameters against it before any training)."""
    return reference_cnn(dataset_input_shape(dataset), len(class_names(dataset)), width=width)


def import_factory(factory: str, folder: Path) -> Callable[..., Any]:
    """The callable that ``factory`` ("module:callable") names, its module searched in ``folder`` first.

    ``folder`` (a config file's folder, where a user keeps ``mymodels.py`` beside the TOML) is put at the
    front of ``sys.path`` only while importing. Errors say where the module was looked for, which import
    inside it failed, or the nearest name the module does have.
    """
    module_name, _, attribute = factory.partition(":")
    module = _import_from(module_name, folder, factory)
    if not hasattr(module, attribute):
        public = [name for name in dir(module) if not name.startswith("_")]
        near = difflib.get_close_matches(attribute, public, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(
            f"cannot import {factory!r}: {module_name} ({module.__file__}) has no attribute "
            f"{attribute!r}{hint}"
        )
    return getattr(module, attribute)


def _import_from(module_name: str, folder: Path, factory: str) -> ModuleType:
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:  # a parent package of a dotted name is missing
            spec = None
        if spec is None:
            raise ValueError(
                f"cannot import {factory!r} (No module named {module_name!r}); looked in {folder} (the "
                f"config file's folder) and on sys.path ({', '.join(sys.path[1:])})"
            )
        try:
            return importlib.import_module(module_name)
        except Exception as error:  # the user's module itself raised: name it and its failing import
            raise ValueError(
                f"cannot import {factory!r}: importing {module_name} ({spec.origin}) failed: "
                f"{type(error).__name__}: {error}"
            ) from error
    finally:
        sys.path.remove(entry)


@dataclass(frozen=True)
class LoadedModel:
    """A run's model in eval mode on its device, what results.json says of it, and its weights' digest
    (16 hex digits of the sha256 of its state dict, part of every cell's resume key)."""

    model: nn.Module
    description: dict[str, Any]
    digest: str


def load_run_model(spec: ModelSpec, *, dataset: str, folder: Path, device: torch.device) -> LoadedModel:
    """The model a run config's ``[model]`` names: the cached reference CNN for ``dataset`` (trained on
    first use), or the user's checkpoint loaded into their factory's module (looked for in ``folder``)."""
    if spec.checkpoint is None:
        train = TrainConfig(
            dataset=dataset, epochs=spec.epochs, max_train=spec.max_train, width=spec.width, seed=spec.seed
        )
        trained = load_or_train(train, device=device)
        model = trained.model
        description = {"kind": "reference", "train": train.to_dict(), "test_accuracy": trained.test_accuracy}
    else:
        model = _checkpoint_model(spec, folder)
        description = {"kind": "checkpoint", "checkpoint": spec.checkpoint, "factory": spec.factory}
    model = model.to(device).eval()
    digest = hashlib.sha256(
        safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    ).hexdigest()[:16]
    return LoadedModel(model, {**description, "sha256": digest}, digest)


def _checkpoint_model(spec: ModelSpec, folder: Path) -> nn.Module:
    """``factory(**factory_kwargs)`` with the checkpoint's state dict; errors name the key at fault."""
    try:
        factory = import_factory(spec.factory, folder)
    except ValueError as error:
        raise ValueError(f"model.factory: {error}") from error
    model = factory(**spec.factory_kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model.factory: {spec.factory!r} returned {type(model).__name__}, not a torch module"
        )
    try:
        model.load_state_dict(safetensors.torch.load_file(spec.checkpoint))
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"model.checkpoint: cannot load {spec.checkpoint!r} into {spec.factory} ({error})"
        ) from error
    return model


def dataset_input_shape(name: str) -> tuple[int, int, int]:
    """Sample shape of a known dataset, without loading it."""
    return {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}[
        name
    ]


def _num_classes(model: nn.Module) -> int:
    """Output size of the model's last Linear layer."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model: expected a reference_cnn (ending in nn.Linear), found no Linear layer")
    return linears[-1].out_features


def _check_architecture(
    model: nn.Module, shape: tuple[int, int, int], num_classes: int, config: TrainConfig, where: str
) -> None:
    """ValueError unless ``model``'s parameters have exactly the shapes of ``config``'s architecture."""
    built = build_model(config.architecture, shape, num_classes, width=config.width)
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        raise ValueError(
            f"{where}: not a {config.architecture}({shape}, {num_classes}, width={config.width}): "
            f"parameter shapes {actual} differ from {expected}"
        )


def load_model(path_stem: Path) -> TrainedModel:
    """Read a model saved by :func:`save_model`, checking manifest, schema version and weights hash.

    Anything missing, corrupt, tampered with or written by a newer xaiadv is a ValueError that says
    to delete the files and train again. Weights are read with safetensors: no pickle involved.
    """
    stem = Path(path_stem)
    manifest_path, weights = _manifest_path(stem), _weights_path(stem)
    advice = f"delete {manifest_path} and {weights} and train again"
    manifest = _read_manifest(manifest_path, advice)
    config, shape, num_classes = _manifest_fields(manifest, manifest_path, advice)
    try:
        blob = weights.read_bytes()
    except OSError as e:
        raise ValueError(f"{weights}: cannot read the model weights ({e}); {advice}") from e
    if hashlib.sha256(blob).hexdigest() != manifest["weights_sha256"]:
        raise ValueError(f"{weights}: sha256 does not match the manifest (corrupt or tampered); {advice}")
    try:
        state = safetensors.torch.load(blob)
        model = build_model(config.architecture, shape, num_classes, width=config.width)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors' own error type, or load_state_dict's RuntimeError
        raise ValueError(f"{weights}: weights do not fit the manifest ({e}); {advice}") from e
    return TrainedModel(
        model=model.eval(), config=config, test_accuracy=float(manifest["test_accuracy"]), path=weights
    )


def _read_manifest(path: Path, advice: str) -> dict[str, Any]:
    """The manifest as a dict; ValueError when missing, not JSON, or of a newer schema."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: model manifest missing; {advice}") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: corrupt model manifest ({e}); {advice}") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: corrupt model manifest (not a JSON object); {advice}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: corrupt model manifest (schema_version {version!r}); {advice}")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version} is newer than this xaiadv reads ({SCHEMA_VERSION}); "
            f"upgrade xaiadv, or {advice}"
        )
    return manifest


def _manifest_fields(
    manifest: dict[str, Any], path: Path, advice: str
) -> tuple[TrainConfig, tuple[int, int, int], int]:
    """Config, input shape and class count from a manifest; ValueError when any is missing or invalid."""
    try:
        config = TrainConfig(**manifest["config"])
        shape = _check_input_shape(tuple(manifest["input_shape"]))
        num_classes = manifest["num_classes"]
        _check_positive_int("num_classes", num_classes)
        if not isinstance(manifest["weights_sha256"], str) or not isinstance(
            manifest["test_accuracy"], int | float
        ):
            raise ValueError("weights_sha256 or test_accuracy has the wrong type")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt model manifest ({e!r}); {advice}") from e
    return config, shape, num_classes


# --------------------------------------------------------------------------------------------------
# Retrained models: the retraining study's immune models, cached beside the clear ones, never over them

#: The cache's sub-folder of retrained models (``<cache>/models/retrained/<key>``): a clear model's files
#: (``<cache>/models/<dataset>-<key>``) can never be the ones an immune model is written to.
RETRAINED = "retrained"


@dataclass(frozen=True)
class RetrainedModel:
    """A model retrained from a clear one, in eval mode on the clear model's device; ``key`` (16 hex digits)
    names its cache files, ``path`` is its ``.safetensors`` file."""

    model: nn.Module
    key: str
    path: Path


def retrained_key(base_digest: str, retraining: Mapping[str, Any]) -> str:
    """The cache key of a retraining: sha256 of the clear model's weights digest and the retraining's
    sorted JSON, 16 hex digits (a different attack or protocol, or other clear weights, give another)."""
    text = json.dumps({"base": base_digest, "retraining": retraining}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_retrain(
    clear: nn.Module,
    base_digest: str,
    retraining: Mapping[str, Any],
    retrain: Callable[[nn.Module], nn.Module],
    *,
    cache_dir: Path | None = None,
) -> RetrainedModel:
    """The model ``retrain`` makes from a copy of ``clear``: from the cache, or retrained and saved there.

    ``base_digest``: the clear model's weights digest (:class:`LoadedModel`); ``retraining``: JSON-ready,
    everything else that determines the retrained weights. Saved as ``models/retrained/<key>.safetensors``
    and a JSON manifest (the digest, the retraining, the weights' sha256) written last, atomically.
    ``clear`` is never modified: ``retrain`` gets a deep copy.
    """
    key = retrained_key(base_digest, retraining)
    stem = (cache_dir if cache_dir is not None else default_cache_dir()) / "models" / RETRAINED / key
    model = copy.deepcopy(clear)
    if _manifest_path(stem).exists():
        _load_retrained(stem, model, base_digest, retraining)
        logger.info("loaded cached retrained model %s", _weights_path(stem))
    else:
        model = retrain(model)
        _save_retrained(stem, model, base_digest, retraining, key)
    return RetrainedModel(model.eval(), key, _weights_path(stem))


def _save_retrained(
    stem: Path, model: nn.Module, base_digest: str, retraining: Mapping[str, Any], key: str
) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    blob = safetensors.torch.save(tensors)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": RETRAINED,
        "key": key,
        "base_sha256": base_digest,
        "retraining": retraining,
        "weights_file": _weights_path(stem).name,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(_weights_path(stem), blob)
    atomic_write(_manifest_path(stem), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    logger.info("saved retrained model to %s", _weights_path(stem))


def _load_retrained(stem: Path, model: nn.Module, base_digest: str, retraining: Mapping[str, Any]) -> None:
    """Load a retrained model's weights into ``model`` (a copy of the clear one) after checking that the
    manifest names this clear model and this retraining and that the weights match their sha256."""
    manifest_path, weights = _manifest_path(stem), _weights_path(stem)
    advice = f"delete {manifest_path} and {weights} and run again"
    manifest = _read_manifest(manifest_path, advice)
    wanted = {"base_sha256": base_digest, "retraining": json.loads(json.dumps(retraining))}
    if any(manifest.get(name) != value for name, value in wanted.items()):
        raise ValueError(f"{manifest_path}: holds another retraining than the requested {wanted}; {advice}")
    try:
        blob = weights.read_bytes()
    except OSError as e:
        raise ValueError(f"{weights}: cannot read the model weights ({e}); {advice}") from e
    if hashlib.sha256(blob).hexdigest() != manifest.get("weights_sha256"):
        raise ValueError(f"{weights}: sha256 does not match the manifest (corrupt or tampered); {advice}")
    try:
        model.load_state_dict(safetensors.torch.load(blob), strict=True)
    except Exception as e:  # safetensors' own error type, or load_state_dict's RuntimeError
        raise ValueError(f"{weights}: weights do not fit the clear model ({e}); {advice}") from e


def craft_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    params: Mapping[str, Any],
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 128,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``attack`` (a registry name with ``params``) against ``model`` on raw ``x`` (N, C, H, W) with labels
    ``y`` (N,), ``batch_size`` images at a time on ``device`` (default CPU): the adversarial images (N, C, H,
    W), float32 on CPU.

    How the retraining study attacks its training images with the clear model and the transfer study crafts
    its examples on the substitute.
    """
    from xaiadv.bridge.registry import build_attack  # the bridge imports the attack libraries: on use

    _check_positive_int("batch_size", batch_size)
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels, one per sample of x; got {len(y)}")
    device = device or torch.device("cpu")
    built = build_attack(attack, model=model, bounds=bounds, **params)
    return torch.cat(
        [
            built(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)).detach().float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )
