"""Weights files: numpy ``.npz`` archives read with ``allow_pickle=False``.

A weights file is a flat map of named arrays (see :func:`nic.model.to_arrays`):
tensors, the config as UTF-8 JSON bytes, and the integer tables. Its identity is
the SHA-256 of a canonical serialization of those arrays (name, dtype, shape,
bytes, sorted by name), so the zip wrapper's metadata never changes it; the
first 8 bytes of that digest go into every .nic file.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

DEFAULT_NAME = "default.npz"
ENV_DIR = "NIC_WEIGHTS_DIR"


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or not the one a .nic file needs."""


def weights_hash(arrays: dict[str, np.ndarray]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.digest()[:8]


def read_arrays(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise WeightsError(f"not a valid weights file ({exc})") from None


def save_weights(arrays: dict[str, np.ndarray], path: Path) -> bytes:
    """Write atomically; returns the weights hash."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return weights_hash(arrays)


def shipped_dir() -> Path:
    """Folder of the shipped weights (the package ``nic.pretrained``)."""
    from importlib.resources import files

    return Path(str(files("nic.pretrained")))


@lru_cache(maxsize=8)
def _load_path(path: str, mtime: float):
    from .model import from_arrays

    arrays = read_arrays(Path(path).read_bytes())
    try:
        model = from_arrays(arrays)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    return model, weights_hash(arrays)


def load_weights(path: Path | str):
    """(model, hash) from a weights file; cached per process."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise WeightsError(f"cannot read weights {path}: {exc.strerror}") from None
    return _load_path(str(path.resolve()), mtime)


def candidates() -> list[Path]:
    """Weights files to look in, default first: $NIC_WEIGHTS_DIR, then shipped."""
    folders = []
    if os.environ.get(ENV_DIR):
        folders.append(Path(os.environ[ENV_DIR]))
    folders.append(shipped_dir())
    found = []
    for folder in folders:
        if (folder / DEFAULT_NAME).is_file():
            found.append(folder / DEFAULT_NAME)
        found.extend(sorted(p for p in folder.glob("*.npz") if p.name != DEFAULT_NAME))
    return found


def default_weights(path: Path | str | None = None):
    """(model, hash) of the weights to encode with."""
    if path is not None:
        return load_weights(path)
    found = candidates()
    if not found:
        raise WeightsError("no weights installed (expected weights/default.npz)")
    return load_weights(found[0])


def weights_for(model_id: int, wanted: bytes, path: Path | str | None = None):
    """(model, hash) matching a .nic file's model id and weights hash."""
    paths = [Path(path)] if path is not None else candidates()
    for candidate in paths:
        model, digest = load_weights(candidate)
        if digest == wanted and model.config.model_id == model_id:
            return model, digest
    raise WeightsError(f"this file needs weights {wanted.hex()} (model id {model_id}), which are not installed; "
                       f"pass them with --weights or install the nic version that made the file")
