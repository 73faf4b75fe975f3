"""Weights files: numpy ``.npz`` archives read with ``allow_pickle=False``.

A weights file is a flat map of named arrays (see a family's ``to_arrays``, :mod:`nic.families`):
tensors, the config as UTF-8 JSON bytes, and the integer tables. Its identity is
the SHA-256 of a canonical serialization of those arrays (name, dtype, shape,
bytes, sorted by name), so the zip wrapper's metadata never changes it; the
first 8 bytes of that digest go into every .nic file.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
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


MAX_WEIGHTS_BYTES = 1 << 30
"""Largest total (uncompressed) size of the arrays in a weights file; the shipped ones are ~10 MB."""


def read_arrays(data: bytes) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            # The sizes a zip declares bound what its members can inflate to; refuse big ones
            # before numpy allocates an array of whatever shape a member's header claims.
            total = sum(info.file_size for info in archive.infolist())
        if total > MAX_WEIGHTS_BYTES:
            raise WeightsError(f"not a valid weights file (its arrays would take {total} bytes, "
                               f"more than the {MAX_WEIGHTS_BYTES} allowed)")
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, MemoryError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"not a valid weights file ({exc or type(exc).__name__})") from None


def save_weights(arrays: dict[str, np.ndarray], path: Path) -> bytes:
    """Write atomically (a temporary file, fsync, rename); returns the weights hash."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return weights_hash(arrays)


def shipped_dir() -> Path:
    """Folder of the shipped weights (the package ``nic.pretrained``)."""
    from importlib.resources import files

    return Path(str(files("nic.pretrained")))


@lru_cache(maxsize=8)
def _load_path(path: str, mtime: float, coding: bool):
    from .families import from_arrays, load

    arrays = read_arrays(Path(path).read_bytes())
    try:
        model = (load if coding else from_arrays)(arrays)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    except (TypeError, IndexError, RuntimeError, MemoryError) as exc:
        # A config the network cannot be built from (wrong types, negative or absurd sizes).
        raise WeightsError(f"{path}: not a valid weights file ({type(exc).__name__}: {exc})") from None
    return model, weights_hash(arrays)


def load_weights(path: Path | str, coding: bool = False):
    """(model, hash) from a weights file; cached per process. The trainable model (torch),
    or with ``coding`` the model that codes files (numpy only where the family has one,
    nic.families.load)."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise WeightsError(f"cannot read weights {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO or /dev/zero would never end or fail late
        raise WeightsError(f"cannot read weights {path}: not a regular file")
    if info.st_size > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"cannot read weights {path}: {info.st_size} bytes, more than the "
                           f"{MAX_WEIGHTS_BYTES} allowed")
    try:
        return _load_path(str(path.resolve()), info.st_mtime, coding)
    except OSError as exc:
        raise WeightsError(f"cannot read weights {path}: {exc.strerror or exc}") from None


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


@lru_cache(maxsize=64)
def _peek_model_id(path: str, mtime: float) -> int | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            from .families import model_id_of

            return model_id_of({"config": archive["config"]})
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError):
        return None  # load_weights says what is wrong, if this file is ever picked


def model_id_of_file(path: Path) -> int | None:
    """The model id a weights file's config names (its config alone is read), or None."""
    try:
        return _peek_model_id(str(path.resolve()), path.stat().st_mtime)
    except OSError:
        return None


def default_weights(path: Path | str | None = None, family: str | None = None, coding: bool = False):
    """(model, hash) of the weights to encode with: ``path``, or the first installed
    weights of ``family`` (by default, of nic.families.DEFAULT, else the first installed);
    ``coding`` as for :func:`load_weights`."""
    from .families import model_id_named, name_of

    if path is not None:
        model, digest = load_weights(path, coding)
        if family is not None and model.config.model_id != model_id_named(family):
            raise WeightsError(f"{path} holds weights of the {name_of(model.config.model_id)} family, "
                               f"not of the {family} family")
        return model, digest
    return load_weights(installed(family), coding)


def installed(family: str | None = None) -> Path:
    """The installed weights file of ``family`` (see :func:`default_weights`)."""
    from .families import DEFAULT, model_id_named

    wanted = model_id_named(family or DEFAULT)
    found = candidates()
    if not found:
        raise WeightsError("no weights installed (expected weights/default.npz)")
    for candidate in found:
        if model_id_of_file(candidate) == wanted:
            return candidate
    if family is not None:
        raise WeightsError(f"no weights of the {family} family are installed; pass them with --weights")
    return found[0]


def weights_for(model_id: int, wanted: bytes, path: Path | str | None = None, coding: bool = False):
    """(model, hash) matching a .nic file's model id and weights hash; ``coding`` as for
    :func:`load_weights`."""
    paths = [Path(path)] if path is not None else candidates()
    for candidate in paths:
        try:
            model, digest = load_weights(candidate, coding)
        except WeightsError:
            if path is not None:
                raise
            continue  # one broken file among the installed ones must not block the others
        if digest == wanted and model.config.model_id == model_id:
            return model, digest
        if path is not None:
            raise WeightsError(f"this file needs weights {wanted.hex()} (model id {model_id}), but {path} "
                               f"holds weights {digest.hex()} (model id {model.config.model_id})")
    raise WeightsError(f"this file needs weights {wanted.hex()} (model id {model_id}), which are not installed; "
                       f"pass them with --weights or install the nic version that made the file")
