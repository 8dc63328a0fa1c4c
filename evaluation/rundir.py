"""The run directory: finished cells as JSON + npz, written atomically, found again on a rerun.

A cell is one unit of work (an attack on the sample, a detector against every attack). Its key is the
hash of everything that determines it; a rerun reuses a finished cell whose key matches and recomputes
nothing else, so an interrupted run loses only the cell it was in. ``results.json`` says ``complete``
only once every cell has finished, and ``report.md`` is removed when a run starts, so a report on disk
never claims more than was computed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xaiadv.plugins.storage import atomic_write

#: results.json's layout. 2: the explanation studies' cells (heatmaps, signatures); 3: the retraining,
#: transfer, vanishing-gradient and adaptive cells (retrainings, transfers, vanishings, adaptives); 4: each
#: detector of ours fitted in its own cell (detector_fits: the saved config and state, arrays in arrays/).
SCHEMA_VERSION = 4


def key_of(*parts: object) -> str:
    """sha256 (16 hex digits) of the parts' canonical JSON: equal configurations give equal keys."""
    text = json.dumps(to_json(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_json(value: object) -> Any:
    """Plain JSON types: numpy scalars and arrays converted, NaN and infinities as None (JSON has none)."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def slug(label: str) -> str:
    """A file-name-safe form of a label, with a short hash so distinct labels never collide."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()[:40] or "cell"
    return f"{readable}-{hashlib.sha256(label.encode()).hexdigest()[:6]}"


class RunDirectory:
    """Paths and atomic reads/writes of one run's output folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def prepare(self) -> None:
        """Create the folders and prove they are writable, before any work; drop a stale report."""
        try:
            for folder in (self.root, self.root / "cells", self.root / "arrays", self.figures):
                folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.root / ".write-test", b"")
            (self.root / ".write-test").unlink()
        except OSError as error:
            raise ValueError(f"output: cannot write to {self.root} ({error.strerror or error})") from error
        self.report.unlink(missing_ok=True)

    def write_json(self, path: Path, data: Mapping[str, Any]) -> None:
        text = json.dumps(to_json(data), indent=1, sort_keys=False, allow_nan=False)
        atomic_write(path, (text + "\n").encode())

    def write_text(self, path: Path, text: str) -> None:
        atomic_write(path, text.encode())

    def cell_path(self, kind: str, label: str) -> Path:
        return self.root / "cells" / f"{kind}-{slug(label)}.json"

    def arrays_path(self, kind: str, label: str) -> Path:
        return self.root / "arrays" / f"{kind}-{slug(label)}.npz"

    def finished_cell(self, kind: str, label: str, key: str) -> dict[str, Any] | None:
        """The saved cell when it finished with this key (and its arrays exist), else None."""
        path = self.cell_path(kind, label)
        try:
            cell = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if cell.get("key") != key or cell.get("status") != "done":
            return None
        if cell.get("arrays") and not self.arrays_path(kind, label).exists():
            return None
        return cell

    def save_cell(
        self, kind: str, label: str, cell: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> None:
        """Arrays first, then the JSON that marks the cell finished: a crash between leaves it unfinished."""
        if arrays:
            self.save_arrays(kind, label, arrays)
        self.write_json(self.cell_path(kind, label), {**cell, "arrays": bool(arrays)})

    def save_arrays(self, kind: str, label: str, arrays: Mapping[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: np.asarray(a) for name, a in arrays.items()})
        atomic_write(self.arrays_path(kind, label), buffer.getvalue())

    def load_arrays(self, kind: str, label: str) -> dict[str, np.ndarray]:
        with np.load(self.arrays_path(kind, label), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
