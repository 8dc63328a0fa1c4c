"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xaiadv.evaluation import data


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Model cache in tmp_path, no $XAIADV_DATA and no system folders: only digits exists."""
    monkeypatch.setenv("XAIADV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XAIADV_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache per test module: its reference CNN is trained once, then found there."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XAIADV_CACHE", str(folder))
        yield folder


def _write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _strict_json(path: Path) -> dict[str, Any]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="session")
def write_config() -> Callable[[Path, str], Path]:
    """``write_config(folder, text)``: the TOML ``text`` written to ``folder/run.toml`` (folder created)."""
    return _write_config


@pytest.fixture(scope="session")
def strict_json() -> Callable[[Path], dict[str, Any]]:
    """``strict_json(path)``: a JSON file read with NaN and infinities refused (JSON has none; Python's json
    module reads them), as results.json must be."""
    return _strict_json
