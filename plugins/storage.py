"""What the library saves (models, fitted detectors) is whole or absent, never half, and never a pickle.

:func:`atomic_write` writes one file. :func:`save_record` / :func:`load_record` are the format of a saved
detector: ``<base>.safetensors`` (the arrays) and ``<base>.json`` (the manifest: :data:`SCHEMA_VERSION`, a
JSON record, the tensors file's sha256). The record is also inside the safetensors header's metadata, so an
edited manifest is caught on load; what the record holds is the caller's (the ART adapters: detector name,
configuration, the plugin's ``get_state()`` dict, :func:`module_sha256` of the network it describes).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from torch import nn

#: Version of the detector save format. 3: the record holds the plugin's ``get_state()`` dict; 2: the
#: adapter's own fitted dict and threshold (still read: ``load_record`` returns the version).
SCHEMA_VERSION = 3
#: The oldest version :func:`load_record` reads.
OLDEST_VERSION = 2
#: The base name used inside a folder: ``save_record("out/", ...)`` writes ``out/detector.safetensors``.
DEFAULT_NAME = "detector"
REFIT = "fit the detector again and save it"
_RECORD_KEY = "xaiadv_detector"


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename it over ``path``.

    The folder must exist: a missing one raises FileNotFoundError naming that folder (not the temp file
    the write would have used), a file in its place NotADirectoryError. Callers that want missing folders
    created make them first.
    """
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is not a folder")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it private
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's state_dict: names, dtypes, shapes and bytes of every tensor, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def record_paths(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(given path, tensors file ``<base>.safetensors``, manifest ``<base>.json``).

    The base is ``path`` without a ``.safetensors``/``.json`` suffix; for an existing folder, or a path
    written with a trailing separator, it is :data:`DEFAULT_NAME` inside that folder.
    """
    text = os.fspath(path)
    given = Path(text)
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if given.is_dir() or text.endswith(separators):
        base = given / DEFAULT_NAME
    else:
        base = given.with_suffix("") if given.suffix in (".safetensors", ".json") else given
    return given, base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def save_record(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """Write ``arrays`` and ``record`` (JSON-able) as ``<path>.safetensors`` and ``<path>.json``, atomically.

    Missing folders are created (as ART's own ``save`` does); a file in the way is named.
    """
    _, tensors_path, manifest_path = record_paths(path)
    data = save_safetensors(
        {key: np.ascontiguousarray(value) for key, value in arrays.items()},
        metadata={_RECORD_KEY: json.dumps(record, sort_keys=True)},
    )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **record,
        "tensors_file": tensors_path.name,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(
            f"cannot save the detector into {tensors_path.parent}: a file is in the way where a folder "
            f"should be"
        ) from None
    atomic_write(tensors_path, data)
    atomic_write(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())


def load_record(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """(arrays, record, schema version) saved at ``path`` by :func:`save_record`, every check passed.

    Refused with a ValueError saying to fit again: a file that is not safetensors (a pickle is never
    loaded), an unreadable manifest, a schema version outside :data:`OLDEST_VERSION` ..
    :data:`SCHEMA_VERSION`, tensors that do not match the manifest's sha256, a manifest whose record
    differs from the one inside the tensors file.
    """
    given, tensors_path, manifest_path = record_paths(path)
    if given.is_file() and given != manifest_path:
        if not _is_safetensors(given.read_bytes()):
            raise _not_safetensors(given)
        if given != tensors_path:
            raise ValueError(f"{given} is not an xaiadv detector save: load <base> for <base>.json")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path} is not a readable manifest ({error}): {REFIT}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} is not an xaiadv detector manifest: {REFIT}")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        version = None
    if version is None or not OLDEST_VERSION <= version <= SCHEMA_VERSION:
        raise ValueError(
            f"{manifest_path} has schema_version {manifest.get('schema_version')!r}; this xaiadv reads "
            f"versions {OLDEST_VERSION} to {SCHEMA_VERSION} (upgrade xaiadv, or {REFIT})"
        )
    data = tensors_path.read_bytes()
    if not _is_safetensors(data):
        raise _not_safetensors(tensors_path)
    if hashlib.sha256(data).hexdigest() != manifest.get("tensors_sha256"):
        raise ValueError(
            f"{tensors_path} does not match its manifest's sha256 (truncated or modified): {REFIT}"
        )
    record = _record(data, tensors_path)
    edited = [key for key in record if _canonical(record[key]) != _canonical(manifest.get(key))]
    if edited:
        raise ValueError(
            f"{manifest_path} does not match the record inside {tensors_path.name} (edited: {edited}): "
            f"{REFIT}"
        )
    return load_safetensors(data), record, version


def save_detector(
    path: str | os.PathLike[str],
    arrays: dict[str, np.ndarray],
    *,
    name: str,
    config: dict[str, Any],
    state: dict[str, Any],
    module: nn.Module,
) -> None:
    """A fitted detector: its ``get_state()`` (``arrays``, ``state``), the ``name`` and ``config`` that
    rebuild it, and :func:`module_sha256` of the ``module`` it describes (:func:`save_record`)."""
    record = {"detector": name, "config": config, "state": state, "classifier_sha256": module_sha256(module)}
    save_record(path, arrays, record)


def load_detector(
    path: str | os.PathLike[str], *, names: Sequence[str], module: nn.Module
) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """(arrays, record, version) of :func:`load_record`, refused unless the save holds a detector named one
    of ``names`` and was fitted on ``module`` (its features describe that network only)."""
    arrays, record, version = load_record(path)
    manifest_path = record_paths(path)[2]
    if record.get("detector") not in names:
        raise ValueError(
            f"{manifest_path} holds a {record.get('detector')!r} detector, not a {names[0]}: load it with "
            f"that class, or {REFIT}"
        )
    if module_sha256(module) != record.get("classifier_sha256"):
        raise ValueError(
            f"{manifest_path} was fitted with a different classifier (parameter hash mismatch): the detector "
            f"describes that network's features only; {REFIT} with this classifier"
        )
    return arrays, record, version


def _is_safetensors(data: bytes) -> bool:
    """The safetensors layout: 8-byte little-endian header length, then a JSON header starting with '{'."""
    if len(data) < 10:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    return 2 <= length <= len(data) - 8 and data[8:9] == b"{"


def _not_safetensors(path: Path) -> ValueError:
    return ValueError(
        f"{path} is not a safetensors file (truncated, or a pickle or foreign file?); xaiadv never "
        f"unpickles detectors: {REFIT}"
    )


def _record(data: bytes, path: Path) -> dict[str, Any]:
    """The record saved in the safetensors header's metadata."""
    (length,) = struct.unpack("<Q", data[:8])
    try:
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
        record = json.loads(metadata[_RECORD_KEY])
    except (KeyError, ValueError, AttributeError, TypeError):
        raise ValueError(f"{path} holds no xaiadv detector record: {REFIT}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds no valid xaiadv detector record: {REFIT}")
    return record


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)
