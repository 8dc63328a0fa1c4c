"""Tests of xaiadv.evaluation.data on tiny files written in each supported format."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from xaiadv.evaluation import data
from xaiadv.evaluation.data import DATASETS, Dataset, DatasetNotFoundError, load_dataset

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
N_TRAIN, N_TEST = 5, 3


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $XAIADV_DATA, no system folders, an empty cache: each test sees only what it writes."""
    monkeypatch.delenv("XAIADV_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": (tmp_path / "system" / "fashion-mnist",)})
    data._CACHE.clear()


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 00 00 08 ndim, big-endian sizes, the bytes."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, *, gz: bool = False, label_offset: int = 0) -> dict[str, np.ndarray]:
    """Write tiny train/t10k IDX files into ``folder``; return the raw arrays written."""
    rng = np.random.default_rng(label_offset)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: (np.arange(N_TRAIN) + label_offset) % 10,
        IDX_FILES[2]: rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: (np.arange(N_TEST) + label_offset + 5) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return arrays


def check_idx_dataset(ds: Dataset, arrays: dict[str, np.ndarray], name: str) -> None:
    """``ds`` holds exactly ``arrays``, scaled to [0, 1], in the documented dtypes and shapes."""
    assert ds.name == name
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.shape == (N_TRAIN, 1, 28, 28)
    assert ds.x_test.shape == (N_TEST, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28)
    assert ds.bounds == (0.0, 1.0)
    np.testing.assert_allclose(ds.x_train[:, 0] * 255, arrays[IDX_FILES[0]], atol=1e-4)
    np.testing.assert_allclose(ds.x_test[:, 0] * 255, arrays[IDX_FILES[2]], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_FILES[1]])
    np.testing.assert_array_equal(ds.y_test, arrays[IDX_FILES[3]])
    assert len(ds.classes) == 10


def cifar_records(labels: list[int], seed: int) -> tuple[bytes, np.ndarray]:
    """Binary CIFAR-10 records for ``labels`` and the (N, 3, 32, 32) images they encode."""
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    blob = b"".join(bytes([label]) + image.tobytes() for label, image in zip(labels, images, strict=True))
    return blob, images


def write_cifar(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Five data batches of 2 records and a test batch of 3 in ``folder``; returns x/y train/test."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        blob, images = cifar_records(labels, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(blob)
        xs.append(images)
        ys += labels
    blob, test_images = cifar_records([9, 0, 4], seed=99)
    (folder / "test_batch.bin").write_bytes(blob)
    return np.concatenate(xs), np.array(ys), test_images, np.array([9, 0, 4])


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_split() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1347, 1, 8, 8) and ds.x_test.shape == (450, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.classes == tuple(str(i) for i in range(10))
    # stratified: each class's test share is a quarter of its samples, to within one sample
    per_class = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    assert np.abs(np.bincount(ds.y_test, minlength=10) - per_class / 4).max() <= 1


def test_digits_split_is_deterministic_and_matches_sklearn() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    _, x_test, _, y_test = train_test_split(
        bunch.images, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target
    )
    ds = load_dataset("digits")
    np.testing.assert_allclose(ds.x_test[:, 0], x_test / 16.0, atol=1e-6)
    np.testing.assert_array_equal(ds.y_test, y_test)


def test_returned_arrays_cannot_corrupt_the_cache() -> None:
    first = load_dataset("digits")
    expected = first.x_train.copy()
    first.x_train[:] = 7.0
    first.y_train[:] = 3
    second = load_dataset("digits")
    np.testing.assert_array_equal(second.x_train, expected)
    assert not np.all(second.y_train == 3)
    assert second.x_train is not first.x_train


# --------------------------------------------------------------------------------------------------
# IDX: Fashion-MNIST and MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_from_explicit_root(tmp_path: Path, name: str, gz: bool) -> None:
    arrays = write_idx_set(tmp_path / "files", gz=gz)
    check_idx_dataset(load_dataset(name, root=tmp_path / "files"), arrays, name)


@pytest.mark.parametrize(("name", "folder"), [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_idx_torchvision_layout_under_root(tmp_path: Path, name: str, folder: str) -> None:
    arrays = write_idx_set(tmp_path / folder / "raw", gz=True)
    check_idx_dataset(load_dataset(name, root=str(tmp_path)), arrays, name)


def test_idx_plain_preferred_when_both_present(tmp_path: Path) -> None:
    plain = write_idx_set(tmp_path, gz=False, label_offset=0)
    write_idx_set(tmp_path, gz=True, label_offset=3)
    check_idx_dataset(load_dataset("mnist", root=tmp_path), plain, "mnist")


@pytest.mark.parametrize("layout", ["named", "torchvision"])
def test_idx_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    folder = tmp_path / "data" / ("fashion_mnist" if layout == "named" else "FashionMNIST/raw")
    arrays = write_idx_set(folder, gz=layout == "named")
    monkeypatch.setenv("XAIADV_DATA", str(tmp_path / "data"))
    check_idx_dataset(load_dataset("fashion_mnist"), arrays, "fashion_mnist")


def test_search_order_root_then_env_then_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = write_idx_set(tmp_path / "system" / "fashion-mnist", gz=True, label_offset=1)
    check_idx_dataset(load_dataset("fashion_mnist"), system, "fashion_mnist")
    env = write_idx_set(tmp_path / "env" / "fashion_mnist", label_offset=2)
    monkeypatch.setenv("XAIADV_DATA", str(tmp_path / "env"))
    check_idx_dataset(load_dataset("fashion_mnist"), env, "fashion_mnist")
    root = write_idx_set(tmp_path / "root", label_offset=3)
    check_idx_dataset(load_dataset("fashion_mnist", root=tmp_path / "root"), root, "fashion_mnist")


def test_system_folder_only_for_fashion_mnist(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "system" / "fashion-mnist")
    with pytest.raises(DatasetNotFoundError, match="'mnist' not found"):
        load_dataset("mnist")


def test_explicit_root_is_not_bypassed(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "system" / "fashion-mnist")
    with pytest.raises(DatasetNotFoundError, match="given root") as err:
        load_dataset("fashion_mnist", root=tmp_path / "elsewhere")
    assert str(tmp_path / "elsewhere") in str(err.value)


def test_rewritten_file_is_read_again(tmp_path: Path) -> None:
    write_idx_set(tmp_path, label_offset=0)
    load_dataset("mnist", root=tmp_path)
    labels = np.full(N_TRAIN, 9, dtype=np.uint8)
    path = tmp_path / IDX_FILES[1]
    before = path.stat()
    path.write_bytes(idx_bytes(labels))  # same size, so only the mtime tells the cache
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(load_dataset("mnist", root=tmp_path).y_train, labels)


def test_missing_idx_names_every_place_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAIADV_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist")
    message = str(err.value)
    for place in (
        tmp_path / "env" / "fashion_mnist",
        tmp_path / "env" / "FashionMNIST" / "raw",
        tmp_path / "system" / "fashion-mnist",
    ):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "XAIADV_DATA" in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_without_env_says_env_unset() -> None:
    with pytest.raises(DatasetNotFoundError, match=r"\$XAIADV_DATA \(not set\)"):
        load_dataset("mnist")


def test_incomplete_folder_names_the_missing_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"incomplete: missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", root=tmp_path)


def test_truncated_idx_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated or malformed IDX"):
        load_dataset("mnist", root=tmp_path)


def test_truncated_gzip_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        load_dataset("fashion_mnist", root=tmp_path)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"\x01\x00\x08\x03", "bad magic number"),
        (b"\x00\x00\x0d\x03", r"dtype code 0x0d, expected 0x08"),
        (b"\x00\x00\x08\x02", "2 dimensions, expected 3"),
    ],
)
def test_malformed_idx_header(tmp_path: Path, header: bytes, match: str) -> None:
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(header + path.read_bytes()[4:])
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist", root=tmp_path)


def test_label_count_mismatch(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(N_TRAIN - 1, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: 4 labels for 5 images"):
        load_dataset("mnist", root=tmp_path)


def test_wrong_image_size(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((N_TEST, 8, 8), dtype=np.uint8)))
    with pytest.raises(ValueError, match="expected 28x28 images, got 8x8"):
        load_dataset("mnist", root=tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 12], dtype=np.uint8)))
    with pytest.raises(ValueError, match="label 12 out of range"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 binary


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-bin"])
def test_cifar_binary_from_root(tmp_path: Path, subdir: str) -> None:
    x_train, y_train, x_test, y_test = write_cifar(tmp_path / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-bin" if subdir else tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32)
    np.testing.assert_allclose(ds.x_train * 255, x_train, atol=1e-4)
    np.testing.assert_allclose(ds.x_test * 255, x_test, atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"


def test_cifar_channel_planes(tmp_path: Path) -> None:
    """Each record is 1024 red bytes, then green, then blue, rows first."""
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar(folder)
    pixels = np.zeros(3072, dtype=np.uint8)
    pixels[1024] = 255  # first green byte -> channel 1, row 0, col 0
    pixels[32] = 51  # red byte 32 -> channel 0, row 1, col 0
    (folder / "test_batch.bin").write_bytes(bytes([3]) + pixels.tobytes())
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.x_test[0, 1, 0, 0] == 1.0
    assert ds.x_test[0, 0, 1, 0] == pytest.approx(0.2)
    assert ds.x_test.sum() == pytest.approx(1.2)


def test_cifar_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, y_train, _, _ = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-bin")
    monkeypatch.setenv("XAIADV_DATA", str(tmp_path))
    np.testing.assert_array_equal(load_dataset("cifar10").y_train, y_train)


def test_cifar_truncated_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar(folder)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: truncated or malformed CIFAR-10"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_pickled_version_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"\x80\x04N.")  # a pickle that would be loaded if we unpickled
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    message = str(err.value)
    assert "pickled" in message and "refused" in message and "binary version is needed" in message
    assert str(folder) in message
    assert "cifar-10-binary.tar.gz" in message


def test_cifar_missing_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAIADV_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10")
    message = str(err.value)
    assert str(tmp_path / "cifar10") in message
    assert str(tmp_path / "cifar10" / "cifar-10-batches-bin") in message
    assert "pickled" not in message


# --------------------------------------------------------------------------------------------------
# names and the Dataset type


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; expected one of") as err:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


def test_dataset_validates_its_arrays() -> None:
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    y = np.zeros(2, dtype=np.int64)
    with pytest.raises(ValueError, match="x_train: expected a float32 array"):
        Dataset("t", x.astype(np.float64), y, x, y, ("a",))
    with pytest.raises(ValueError, match=r"y_test: expected an int64 array shaped \(2,\)"):
        Dataset("t", x, y, x, y[:1], ("a",))
    with pytest.raises(ValueError, match="x_test: expected samples shaped"):
        Dataset("t", x, y, np.zeros((2, 1, 4, 4), dtype=np.float32), y, ("a",))
    assert "input_shape=(1, 8, 8)" in repr(Dataset("t", x, y, x, y, ("a",)))


@pytest.mark.slow
def test_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Fashion-MNIST of Debian's dataset-fashion-mnist package, found without arguments."""
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),)})
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert ds.classes[9] == "Ankle boot"


def test_training_subset_is_seeded_ordered_and_leaves_the_test_split() -> None:
    from xaiadv.evaluation.data import training_subset

    data = load_dataset("digits")
    subset = training_subset(data, 100, seed=3)
    assert len(subset.x_train) == len(subset.y_train) == 100
    assert np.array_equal(subset.x_test, data.x_test) and np.array_equal(subset.y_test, data.y_test)
    keep = np.sort(np.random.default_rng(3).permutation(len(data.x_train))[:100])
    assert np.array_equal(subset.x_train, data.x_train[keep]) and np.array_equal(
        subset.y_train, data.y_train[keep]
    )
    assert np.array_equal(training_subset(data, 100, seed=3).y_train, subset.y_train)
    assert not np.array_equal(training_subset(data, 100, seed=4).y_train, subset.y_train)
    assert len(training_subset(data, 10**6, seed=0).x_train) == len(data.x_train)
