"""Data loaders for the evaluation: scikit-learn digits, Fashion-MNIST, MNIST and CIFAR-10.

Every loader returns a :class:`Dataset` of float32 images in ``[0, 1]`` shaped ``(N, C, H, W)`` and
int64 labels, so attacks, detectors and reference models see one format whatever the source.
Files are parsed with numpy only: IDX for (Fashion-)MNIST and the *binary* CIFAR-10 distribution.
The pickled CIFAR-10 python version is refused on purpose: unpickling runs arbitrary code.

``digits`` ships with scikit-learn and is always available; it is the embedded default for demos
and tests. The others are searched for in, in order: the explicit ``root`` (exclusively, when
given), ``$XAIADV_DATA``, then system folders such as Debian's ``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

__all__ = ["DATASETS", "SYSTEM_DIRS", "Dataset", "DatasetNotFoundError", "class_names", "load_dataset"]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "mnist", "cifar10")

ENV_DATA = "XAIADV_DATA"

#: Folders searched last, after ``root`` and ``$XAIADV_DATA``; Debian's package installs here.
SYSTEM_DIRS: Mapping[str, tuple[Path, ...]] = MappingProxyType(
    {"fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
)

_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_CLASSES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "digits": _DIGIT_CLASSES,
        "mnist": _DIGIT_CLASSES,
        "fashion_mnist": (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        "cifar10": (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
    }
)

# torchvision's folder names: <root>/FashionMNIST/raw, <root>/MNIST/raw.
_TORCHVISION_NAMES = MappingProxyType({"fashion_mnist": "FashionMNIST", "mnist": "MNIST"})
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_PICKLED_DIR = "cifar-10-batches-py"
_CIFAR_FILES = (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")
_CIFAR_RECORD = 1 + 3 * 32 * 32

_HOW_TO_GET = MappingProxyType(
    {
        "fashion_mnist": (
            "apt-get install dataset-fashion-mnist (Debian/Ubuntu; it installs "
            "/usr/share/datasets/fashion-mnist), "
            "or put the four IDX files (plain or .gz) from https://github.com/zalandoresearch/fashion-mnist "
            f"into ${ENV_DATA}/fashion_mnist, or run torchvision.datasets.FashionMNIST(root=${ENV_DATA}, "
            "download=True), or pass root=<folder>."
        ),
        "mnist": (
            f"put the four IDX files (plain or .gz) into ${ENV_DATA}/mnist, or run "
            f"torchvision.datasets.MNIST(root=${ENV_DATA}, download=True), or pass root=<folder>."
        ),
        "cifar10": (
            "download the binary version https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz and "
            f"extract it into ${ENV_DATA}/cifar10 (giving ${ENV_DATA}/cifar10/{_CIFAR_DIR}), "
            "or pass root=<folder holding it>."
        ),
    }
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched places; the message lists them and how to get it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test split of an image classification dataset, ready for a torch model.

    Images are float32 ``(N, C, H, W)`` in ``[0, 1]``, labels int64 ``(N,)``. The arrays belong to
    the caller: each :func:`load_dataset` call returns fresh ones, so changing them is harmless.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
                raise ValueError(
                    f"x_{split}: expected a float32 array shaped (N, C, H, W), got {_describe(x)}"
                )
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"y_{split}: expected an int64 array shaped ({len(x)},), got {_describe(y)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_test: expected samples shaped {self.x_train.shape[1:]} like x_train, "
                f"got {self.x_test.shape[1:]}"
            )
        if not self.classes:
            raise ValueError("classes: expected at least one class name, got none")

    @property
    def bounds(self) -> tuple[float, float]:
        """Range of the pixel values, as ART and Foolbox take it."""
        return (0.0, 1.0)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample, ``(C, H, W)``."""
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"input_shape={self.input_shape}, classes={len(self.classes)})"
        )


def training_subset(data: Dataset, n: int, seed: int) -> Dataset:
    """``data`` with a seeded random subset of at most ``n`` training images, kept in their original order."""
    keep = np.sort(np.random.default_rng(seed).permutation(len(data.x_train))[:n])
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def _describe(a: object) -> str:
    """Short description of an array-like for error messages."""
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array shaped {a.shape}"
    return type(a).__name__


# --------------------------------------------------------------------------------------------------
# Public entry point


def class_names(name: str) -> tuple[str, ...]:
    """The class names of data set ``name`` (one of :data:`DATASETS`), without loading it."""
    return _CLASSES[name]


def load_dataset(name: str, root: str | os.PathLike[str] | None = None) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as float32 images in ``[0, 1]``.

    ``root``, when given, is the only place looked in: the folder holding the files, a torchvision
    root (``root/FashionMNIST/raw``) or a folder with ``root/<name>``. Without it the search goes
    ``$XAIADV_DATA/<name>``, the torchvision layout under ``$XAIADV_DATA``, then :data:`SYSTEM_DIRS`.
    Raises :class:`DatasetNotFoundError` naming every place looked, ValueError for malformed files.
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        x_train, y_train, x_test, y_test = _cached(("digits", "sklearn", ()), _read_digits)
        scale = 16.0
    else:
        folder, files = _find(name, root)
        reader = _read_cifar if name == "cifar10" else _read_idx_set
        key = (name, str(folder.resolve()), _stat_key(files))
        x_train, y_train, x_test, y_test = _cached(key, lambda: reader(files))
        scale = 255.0
        logger.debug("loaded %s from %s", name, folder)
    return Dataset(
        name=name,
        x_train=_to_float(x_train, scale),
        y_train=y_train.astype(np.int64),
        x_test=_to_float(x_test, scale),
        y_test=y_test.astype(np.int64),
        classes=_CLASSES[name],
    )


def _to_float(raw: np.ndarray, scale: float) -> np.ndarray:
    """New float32 array ``raw / scale``; the cached raw array is never handed out."""
    out = raw.astype(np.float32)
    out /= np.float32(scale)
    return out


# --------------------------------------------------------------------------------------------------
# Cache of raw (uint8 / small-int) arrays; callers only ever get converted copies of them.

_Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_CACHE: OrderedDict[tuple[object, ...], _Raw] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple[object, ...], read: Callable[[], _Raw]) -> _Raw:
    """Raw arrays for ``key``, read once and kept read-only in a small LRU cache."""
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    raw = read()
    for a in raw:
        a.flags.writeable = False
    with _CACHE_LOCK:
        _CACHE[key] = raw
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return raw


def _stat_key(files: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    """Identity of the files' current contents, so a rewritten file is read again."""
    return tuple((str(f), st.st_mtime_ns, st.st_size) for f in files for st in (f.stat(),))


# --------------------------------------------------------------------------------------------------
# Search


def _find(name: str, root: str | os.PathLike[str] | None) -> tuple[Path, tuple[Path, ...]]:
    """First candidate folder holding every file of ``name``, and those files in reading order."""
    looked: list[str] = []
    pickled: list[Path] = []
    for folder in _candidates(name, root):
        files, missing = _files_in(name, folder)
        if not missing:
            return folder, files
        looked.append(_looked_line(folder, missing, len(files) + len(missing)))
        if name == "cifar10":
            pickled.extend(p for p in (folder, folder / _CIFAR_PICKLED_DIR) if _is_pickled_cifar(p))
    raise DatasetNotFoundError(_not_found_message(name, root, looked, pickled))


def _candidates(name: str, root: str | os.PathLike[str] | None) -> list[Path]:
    """Folders to look in, in order; ``root`` when given, else ``$XAIADV_DATA`` then system folders."""
    if root is not None:
        bases = [Path(root).expanduser()]
    else:
        env = os.environ.get(ENV_DATA, "").strip()
        bases = [Path(env).expanduser()] if env else []
    out: list[Path] = []
    for base in bases:
        if root is not None:
            out.append(base)
        out.append(base / name)
        if name in _TORCHVISION_NAMES:
            out.append(base / _TORCHVISION_NAMES[name] / "raw")
    if root is None:
        out.extend(SYSTEM_DIRS.get(name, ()))
    if name == "cifar10":
        out = [p for folder in out for p in (folder, folder / _CIFAR_DIR)]
    return list(dict.fromkeys(out))


def _files_in(name: str, folder: Path) -> tuple[tuple[Path, ...], list[str]]:
    """Files of ``name`` present in ``folder`` (plain preferred over .gz) and names of those missing."""
    found: list[Path] = []
    missing: list[str] = []
    names = _CIFAR_FILES if name == "cifar10" else _IDX_FILES
    for f in names:
        options = (folder / f,) if name == "cifar10" else (folder / f, folder / f"{f}.gz")
        hit = next((p for p in options if p.is_file()), None)
        if hit is None:
            missing.append(f if name == "cifar10" else f"{f}[.gz]")
        else:
            found.append(hit)
    return tuple(found), missing


def _looked_line(folder: Path, missing: list[str], total: int) -> str:
    """One line of the not-found message: the folder and what was wrong there."""
    if not folder.is_dir():
        return f"  - {folder} (no such folder)"
    if len(missing) == total:
        return f"  - {folder} (none of the files)"
    return f"  - {folder} (incomplete: missing {', '.join(missing)})"


def _is_pickled_cifar(folder: Path) -> bool:
    """Whether ``folder`` holds the pickled python version of CIFAR-10 (which we refuse to read)."""
    return (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file()


def _not_found_message(name: str, root: object, looked: list[str], pickled: list[Path]) -> str:
    """Error text: every place looked, why the pickled CIFAR-10 is refused, and how to get the data."""
    where = "the given root" if root is not None else f"${ENV_DATA} and the system folders"
    lines = [f"dataset {name!r} not found in {where}; looked in:", *looked]
    if root is None and not os.environ.get(ENV_DATA, "").strip():
        lines.append(f"  - ${ENV_DATA} (not set)")
    if pickled:
        lines.append(
            "found the pickled python version of CIFAR-10 at "
            + ", ".join(str(p) for p in dict.fromkeys(pickled))
            + "; it is refused (unpickling can run arbitrary code): the binary version is needed."
        )
    lines.append(f"to get it: {_HOW_TO_GET[name]}")
    lines.append("scikit-learn's 'digits' needs no download.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Readers


def _read_digits() -> _Raw:
    """scikit-learn's 8x8 digits (values 0..16), split 75/25 stratified with random_state=0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target.astype(np.int64), test_size=0.25, random_state=0, stratify=bunch.target
    )
    return (np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


def _read_idx_set(files: tuple[Path, ...]) -> _Raw:
    """Train/test images ``(N, 1, 28, 28)`` uint8 and labels from the four IDX files."""
    out: list[np.ndarray] = []
    for images_file, labels_file in (files[0:2], files[2:4]):
        images = _read_idx(images_file, ndim=3)
        labels = _read_idx(labels_file, ndim=1)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{images_file}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
        if len(labels) != len(images):
            raise ValueError(f"{labels_file}: {len(labels)} labels for {len(images)} images in {images_file}")
        _check_labels(labels, labels_file)
        out += [images.reshape(-1, 1, 28, 28), labels]
    return (out[0], out[1], out[2], out[3])


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Parse one IDX file (plain or gzip) of unsigned bytes with ``ndim`` dimensions.

    Layout: magic ``00 00 08 ndim``, then ``ndim`` big-endian uint32 sizes, then the bytes.
    Any deviation (bad magic, dtype code, truncated or trailing data) is a ValueError naming the file.
    """
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < 4 or raw[0:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX dtype code 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    if raw[3] != ndim:
        raise ValueError(f"{path}: IDX file with {raw[3]} dimensions, expected {ndim}")
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: truncated or malformed IDX file: header says {dims} = {expected} bytes of data, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in .gz; a broken gzip is a ValueError."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e


def _read_cifar(files: tuple[Path, ...]) -> _Raw:
    """CIFAR-10 binary batches: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    parts = [_read_cifar_batch(f) for f in files]
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return (x_train, y_train, parts[5][0], parts[5][1])


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary CIFAR-10 batch file as images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)``."""
    raw = path.read_bytes()
    if not raw or len(raw) % _CIFAR_RECORD:
        raise ValueError(
            f"{path}: truncated or malformed CIFAR-10 binary batch: {len(raw)} bytes is not a "
            f"positive multiple of the {_CIFAR_RECORD}-byte record"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].copy()
    _check_labels(labels, path)
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _check_labels(labels: np.ndarray, path: Path) -> None:
    """All labels within the ten classes of these datasets."""
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{path}: label {int(labels.max())} out of range 0..9")
