"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
