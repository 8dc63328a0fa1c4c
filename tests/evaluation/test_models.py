"""Tests of xaiadv.evaluation.models: architecture, seeded training, and the safetensors cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from xaiadv.evaluation import models
from xaiadv.evaluation.data import Dataset, load_dataset
from xaiadv.evaluation.models import (
    SCHEMA_VERSION,
    TrainConfig,
    TrainedModel,
    default_cache_dir,
    load_model,
    load_or_train,
    reference_cnn,
    save_model,
    train_reference_model,
)

# Measured with the default config on digits (seed 0, torch 2.14 CPU): 0.940. Seeds 0..9 gave
# 0.889..0.942, so the floor below holds for the default seed with a margin of nine test samples.
DIGITS_ACCURACY_FLOOR = 0.92
FAST = TrainConfig(dataset="digits", epochs=1, width=4, max_train=64)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained_default(digits: Dataset) -> TrainedModel:
    return train_reference_model(digits, TrainConfig(dataset="digits"))


@pytest.fixture
def saved_fast(digits: Dataset, tmp_path: Path) -> tuple[Path, TrainedModel]:
    trained = train_reference_model(digits, FAST)
    stem = tmp_path / "models" / "fast"
    save_model(stem, trained.model, FAST, trained.test_accuracy)
    return stem, trained


# --------------------------------------------------------------------------------------------------
# architecture


@pytest.mark.parametrize(
    ("shape", "n_pools"), [((1, 8, 8), 1), ((1, 28, 28), 2), ((3, 32, 32), 2)], ids=["8x8", "28x28", "32x32"]
)
def test_reference_cnn_shapes(shape: tuple[int, int, int], n_pools: int) -> None:
    model = reference_cnn(shape, 7, width=8)
    assert model(torch.rand(3, *shape)).shape == (3, 7)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == n_pools
    assert sum(isinstance(m, nn.Conv2d) for m in model) == 2 * n_pools
    assert sum(isinstance(m, nn.ReLU) for m in model) == 2 * n_pools + 1
    assert isinstance(model[-1], nn.Linear) and model[-1].out_features == 7
    assert not any(isinstance(m, nn.BatchNorm2d | nn.Dropout) for m in model.modules())


def test_reference_cnn_mnist_has_the_thesis_parameter_count() -> None:
    """Section 3.1.3 of the thesis: the MNIST CNN has 467,818 parameters."""
    model = reference_cnn((1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 467_818


def test_reference_cnn_width_scales_channels() -> None:
    model = reference_cnn((3, 32, 32), 10, width=16)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32]
    assert convs[0].in_channels == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (1, 8), "num_classes": 10}, "input_shape: expected"),
        ({"input_shape": (0, 8, 8), "num_classes": 10}, "input_shape: expected"),
        ({"input_shape": (1, 1, 8), "num_classes": 10}, "input_shape: expected"),
        ({"input_shape": (1, 8, 8), "num_classes": 0}, "num_classes: expected an integer >= 1"),
        ({"input_shape": (1, 8, 8), "num_classes": 10, "width": 2.5}, "width: expected an integer >= 1"),
    ],
)
def test_reference_cnn_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reference_cnn(**kwargs)


# --------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dataset", "imagenet", "dataset: expected one of digits, fashion_mnist, mnist, cifar10"),
        ("epochs", 0, "epochs: expected an integer >= 1"),
        ("epochs", True, "epochs: expected an integer >= 1"),
        ("batch_size", 1.5, "batch_size: expected an integer >= 1"),
        ("lr", 0.0, "lr: expected a finite number > 0"),
        ("lr", float("nan"), "lr: expected a finite number > 0"),
        ("lr", "1e-3", "lr: expected a finite number > 0"),
        ("width", -1, "width: expected an integer >= 1"),
        ("seed", -1, "seed: expected an integer >= 0"),
        ("max_train", 0, "max_train: expected an integer >= 1"),
        ("threads", 0, "threads: expected an integer >= 1"),
    ],
)
def test_config_validation(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_config_key_is_stable_and_sensitive() -> None:
    base = TrainConfig(dataset="digits")
    assert base.key() == TrainConfig(dataset="digits").key()
    assert len(base.key()) == 12 and int(base.key(), 16) >= 0
    assert TrainConfig(dataset="digits", lr=1).key() == TrainConfig(dataset="digits", lr=1.0).key()
    others = (
        TrainConfig(dataset="digits", seed=1),
        TrainConfig(dataset="mnist"),
        TrainConfig(dataset="digits", threads=1),
    )
    assert len({base.key(), *(other.key() for other in others)}) == 4


# --------------------------------------------------------------------------------------------------
# training


def test_training_on_digits_reaches_the_floor(trained_default: TrainedModel, digits: Dataset) -> None:
    assert trained_default.test_accuracy >= DIGITS_ACCURACY_FLOOR
    assert not trained_default.model.training
    x = torch.tensor(digits.x_test)
    with torch.no_grad():
        pred = trained_default.model(x).argmax(1).numpy()
    assert (pred == digits.y_test).mean() == pytest.approx(trained_default.test_accuracy)
    assert trained_default.path is None


def test_training_is_reproducible_and_leaves_global_rng(digits: Dataset) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = train_reference_model(digits, FAST)
    assert torch.rand(1) == expected_next  # training did not reseed or advance the global RNG
    b = train_reference_model(digits, FAST)
    c = train_reference_model(digits, TrainConfig(dataset="digits", epochs=1, width=4, max_train=64, seed=1))
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model[0].weight, c.model[0].weight)


def _weights(trained: TrainedModel) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trained.model.parameters()])


def test_training_runs_on_its_own_thread_count_whatever_the_caller_has(digits: Dataset) -> None:
    """A Ray worker (OMP_NUM_THREADS=1) and the driver (2 threads) train the same weights: the count is the
    config's. Another count gives other weights (float sums in another order), which is why it is pinned."""
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        on_one = train_reference_model(digits, FAST)
        assert torch.get_num_threads() == 1  # the caller's count is restored
        torch.set_num_threads(2)
        on_two = train_reference_model(digits, FAST)
    finally:
        torch.set_num_threads(caller)
    assert torch.equal(_weights(on_one), _weights(on_two))
    single = train_reference_model(digits, dataclasses.replace(FAST, threads=1))
    assert not torch.equal(_weights(single), _weights(on_two))


def test_training_rejects_mismatched_dataset(digits: Dataset) -> None:
    with pytest.raises(ValueError, match=r"config\.dataset: 'mnist' does not match the data given"):
        train_reference_model(digits, TrainConfig(dataset="mnist"))


# --------------------------------------------------------------------------------------------------
# save / load / cache


def test_save_load_roundtrip_gives_identical_logits(
    saved_fast: tuple[Path, TrainedModel], digits: Dataset
) -> None:
    stem, trained = saved_fast
    loaded = load_model(stem)
    x = torch.tensor(digits.x_test[:32])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), trained.model(x))
    assert loaded.config == FAST
    assert loaded.test_accuracy == trained.test_accuracy
    assert loaded.path == stem.parent / "fast.safetensors"
    assert not loaded.model.training
    manifest = json.loads((stem.parent / "fast.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["input_shape"] == [1, 8, 8] and manifest["num_classes"] == 10
    assert manifest["config"] == FAST.to_dict()
    assert len(manifest["weights_sha256"]) == 64
    assert sorted(p.name for p in stem.parent.iterdir()) == ["fast.json", "fast.safetensors"]  # no temp files
    assert (stem.parent / "fast.json").stat().st_mode & 0o777 == 0o644


def test_tampered_weights_are_rejected(saved_fast: tuple[Path, TrainedModel]) -> None:
    stem, _ = saved_fast
    weights = stem.parent / "fast.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"sha256 does not match the manifest.*delete .* and train again"):
        load_model(stem)


def test_missing_weights_are_rejected(saved_fast: tuple[Path, TrainedModel]) -> None:
    stem, _ = saved_fast
    (stem.parent / "fast.safetensors").unlink()
    with pytest.raises(ValueError, match=r"cannot read the model weights.*train again"):
        load_model(stem)


def test_future_schema_is_rejected(saved_fast: tuple[Path, TrainedModel]) -> None:
    stem, _ = saved_fast
    path = stem.parent / "fast.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"schema_version {SCHEMA_VERSION + 1} is newer.*train again"):
        load_model(stem)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: "{not json", "corrupt model manifest"),
        (lambda m: json.dumps([1, 2]), "not a JSON object"),
        (lambda m: json.dumps({**m, "schema_version": "1"}), r"schema_version '1'"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "config"}), "KeyError"),
        (lambda m: json.dumps({**m, "config": {**m["config"], "epochs": 0}}), "epochs: expected"),
        (lambda m: json.dumps({**m, "config": {**m["config"], "width": 8}}), "weights do not fit"),
    ],
    ids=["not-json", "not-object", "schema-type", "no-config", "bad-config", "wrong-width"],
)
def test_corrupt_manifest_is_rejected(saved_fast: tuple[Path, TrainedModel], edit, match: str) -> None:
    stem, _ = saved_fast
    path = stem.parent / "fast.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(ValueError, match=match) as err:
        load_model(stem)
    assert "delete" in str(err.value) and "train again" in str(err.value)


def test_missing_manifest_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nothing\.json: model manifest missing; delete"):
        load_model(tmp_path / "nothing")


def test_save_rejects_a_foreign_model(tmp_path: Path) -> None:
    foreign = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"model: not a reference_cnn\(\(1, 8, 8\), 10, width=4\)"):
        save_model(tmp_path / "x", foreign, FAST, 0.5)
    assert not list(tmp_path.iterdir())


def test_load_or_train_caches_and_does_not_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: Dataset
) -> None:
    calls: list[TrainConfig] = []
    real_train = models.train_reference_model

    def train_once(data: Dataset, config: TrainConfig, **kwargs) -> TrainedModel:
        if calls:
            raise AssertionError("retrained although the model was cached")
        calls.append(config)
        return real_train(data, config, **kwargs)

    monkeypatch.setattr(models, "train_reference_model", train_once)
    first = load_or_train(FAST, cache_dir=tmp_path)
    assert first.path == tmp_path / "models" / f"digits-{FAST.key()}.safetensors"
    assert first.path.is_file() and first.path.with_suffix(".json").is_file()
    second = load_or_train(FAST, cache_dir=tmp_path)
    assert calls == [FAST]
    assert second.path == first.path and second.test_accuracy == first.test_accuracy
    x = torch.tensor(digits.x_test[:16])
    with torch.no_grad():
        assert torch.equal(second.model(x), first.model(x))


def test_load_or_train_uses_env_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAIADV_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    trained = load_or_train(FAST)
    assert trained.path is not None and trained.path.parent == tmp_path / "env-cache" / "models"


def test_default_cache_dir_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XAIADV_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "xaiadv"


def test_load_or_train_refuses_a_damaged_cache_entry(tmp_path: Path) -> None:
    first = load_or_train(FAST, cache_dir=tmp_path)
    assert first.path is not None
    first.path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="sha256 does not match"):
        load_or_train(FAST, cache_dir=tmp_path)
