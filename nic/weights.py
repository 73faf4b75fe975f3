"""Weights files: numpy ``.npz`` archives read with ``allow_pickle=False``.

A weights file is a flat map of named arrays (see a family's ``to_arrays``, :mod:`nic.families`):
tensors, the config as UTF-8 JSON bytes, and the integer tables. Its identity is
the SHA-256 of a canonical serialization of those arrays (name, dtype, shape,
bytes, sorted by name), so the zip wrapper's metadata never changes it; the
first 8 bytes of that digest go into every .nic file.

Hashing the whole file (tens of MB) would take most of a small image's encoding time,
and coding at one quality reads only one pair of transforms. So beside ``x.npz`` a
digest file ``x.npz.digest`` (written by :func:`save_weights`) records the weights
hash and the zip's member list with each member's CRC-32, size and the place its bytes
begin, and the place and SHA-256 of the zip's central directory. While that directory
is unchanged, the hash is taken from the digest file and the model that codes reads only
the members it uses, straight from the file (each checked against its CRC-32 as it is
read), without parsing the zip (20-30 ms of a small image's encode for the six shipped
files). A digest file of the earlier form (no directory) is checked against the
archive's member list instead. Without a digest file, or when it no longer matches,
the whole file is read and hashed.

A file may share another's arrays instead of holding a copy: the shipped hyperprior
weights name the factorized weights whose transforms they use by that file's weights hash
(their config's ``base``), and the loader reads ``base.*`` from the weights file of that
hash beside them (:class:`Joined`). The hash of the sharing file covers the name, so a
.nic file's weights hash still identifies everything that decodes it.

Weights may also extend earlier weights of their own family (their config's
``extends``, :class:`Extended`): they hold only the arrays they changed (a quality
trained further), and take every other array from the earlier file, which stays
installed beside them so that the files made with it keep decoding. A family encodes
with the installed file named after it (``hyperprior.npz``), if there is one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Mapping
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
    """Write atomically (a temporary file, fsync, rename), then its digest file;
    returns the weights hash."""
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
    digest = weights_hash(arrays)
    write_digest(path, digest)
    return digest


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".digest")


def _members(archive: zipfile.ZipFile) -> list[list]:
    return sorted([info.filename, info.CRC, info.file_size] for info in archive.infolist())


_END = struct.Struct("<4s4H2LH")
"""A zip's end-of-central-directory record (22 bytes without a comment)."""


def _directory(f) -> list | None:
    """[offset, size, SHA-256 hex] of the central directory of the zip open as ``f``
    (binary, seekable), where the file ends with its plain end record (no comment, no
    zip64: what numpy writes); None otherwise."""
    f.seek(0, os.SEEK_END)
    length = f.tell()
    if length < _END.size:
        return None
    f.seek(length - _END.size)
    magic, _, _, _, _, size, offset, comment = _END.unpack(f.read(_END.size))
    if magic != b"PK\x05\x06" or comment or offset + size + _END.size != length:
        return None
    f.seek(offset)
    return [offset, size, hashlib.sha256(f.read(size)).hexdigest()]


def _data_offsets(archive: zipfile.ZipFile, f) -> dict[str, int] | None:
    """Where each member's bytes begin in the file ``f``, where every member is stored
    as it is (numpy's savez); None otherwise."""
    found = {}
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            return None
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<2H", local[26:30])
        found[info.filename] = info.header_offset + 30 + name_length + extra_length
    return found


def write_digest(path: Path, digest: bytes | None = None) -> None:
    """Write ``path``'s digest file (hashing the weights unless ``digest`` is given): the
    weights hash, the zip's members (name, CRC-32, size, and where the bytes of a stored
    member begin) and its central directory's place and SHA-256, which lets a reader
    check the whole directory without parsing it (:func:`_lazy`)."""
    path = Path(path)
    if digest is None:
        digest = _read_and_hash(path)[1]
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        members = _members(archive)
        offsets, directory = _data_offsets(archive, f), _directory(f)
    place = ""
    if offsets is not None and directory is not None:
        members = [member + [offsets[member[0]]] for member in members]
        place = f'"directory": {json.dumps(directory)}, '
    tmp = digest_path(path).with_name(digest_path(path).name + ".tmp")
    lines = ",\n".join(json.dumps(member) for member in members)
    tmp.write_text(f'{{"weights_hash": "{digest.hex()}", {place}"members": [\n{lines}\n]}}\n')
    os.replace(tmp, digest_path(path))


_READING = threading.Lock()
"""Held while any member of an archive of :func:`_archive` is read (they are shared)."""


@lru_cache(maxsize=16)
def _opened(path: str, identity: tuple[int, ...]) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def _archive(path: Path | str) -> zipfile.ZipFile:
    """The weights file ``path`` opened once per process (its directory read once: ~7 ms
    for the shipped files), again if it changed on disk (:func:`_identity`)."""
    return _opened(str(Path(path).resolve()), _identity(os.stat(path)))


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|](?:b1|[iu][1248]|f[248]|c(?:8|16)))', 'fortran_order': False, "
                         rb"'shape': \((|[0-9]+,|[0-9]+(?:, [0-9]+)+)\), \} *\n")
"""The header numpy writes for a plain array of numbers; anything else is read by numpy's own parser."""


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of the .npy file ``member`` is positioned at the start of, where
    its header is the plain one numpy writes, leaving ``member`` at the array's data;
    None otherwise (numpy's reader then parses it). Parsing it here takes microseconds
    where numpy's reader (ast.literal_eval) takes ~70: a small image reads ~140 members."""
    start = member.read(10)
    if len(start) < 10 or start[:6] != _NPY_MAGIC or start[6:8] not in (b"\x01\x00", b"\x02\x00"):
        return None
    if start[6] == 1:
        length = int.from_bytes(start[8:10], "little")
    else:
        length = int.from_bytes(start[8:10] + member.read(2), "little")
    text = member.read(length)
    match = _NPY_HEADER.fullmatch(text) if len(text) == length else None
    if match is None:
        return None
    return tuple(int(n) for n in match.group(2).split(b",") if n.strip()), np.dtype(match.group(1).decode())


class LazyArrays(Mapping):
    """The arrays of an .npz file, each read (and its CRC-32 checked) on first use: through
    zipfile, or with ``direct`` (each member's (CRC-32, size, data offset), from a digest
    file whose record of the zip's directory still holds: :func:`_lazy`) straight from
    the file, without parsing the zip's directory."""

    def __init__(self, path: Path, direct: tuple | None = None):
        self._path = path
        if direct is None:
            self._archive, self._direct = _archive(path), None
            infos = {info.filename: info.file_size for info in self._archive.infolist()}
        else:  # (the file, open, whose directory was checked; the members)
            self._archive = None
            self._file, self._direct = direct
            infos = {name: size for name, (_, size, _) in self._direct.items()}
        self._names = {name[:-4]: name for name in infos if name.endswith(".npy")}
        self._sizes = infos
        self._loaded: dict[str, np.ndarray] = {}
        self._lock = _READING

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._loaded:
            if name not in self._names:
                raise KeyError(name)
            with self._lock:
                if name not in self._loaded:
                    self._loaded[name] = self._guarded(self._names[name], whole=True)
        return self._loaded[name]

    def _guarded(self, filename: str, whole: bool):
        """:meth:`_read`, a damaged member a WeightsError (it may be read mid-encode). A
        member that fails a direct read is read again through zipfile: the digest file
        may be the damaged one."""
        errors = (OSError, EOFError, zipfile.BadZipFile, zlib.error, ValueError)
        try:
            return self._read(filename, whole)
        except errors as exc:
            failure = exc
        if self._direct is not None:
            try:
                self._archive, self._direct = _archive(self._path), None
                return self._read(filename, whole)
            except errors as exc:
                failure = exc
        raise WeightsError(f"{self._path}: not a valid weights file ({filename} is damaged: {failure})") from None

    def member_size(self, name: str) -> int:
        """The bytes of an array's .npy member (its header included)."""
        return self._sizes[self._names[name]]

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of an array, from its header alone."""
        if name in self._loaded:
            return self._loaded[name].shape, self._loaded[name].dtype
        if name not in self._names:
            raise KeyError(name)
        with self._lock:
            return self._guarded(self._names[name], whole=False)

    _HEADER_BYTES = 4096
    """What a direct read takes to find an array's header (numpy writes ~128 bytes)."""

    def _bytes(self, filename: str, whole: bool) -> bytes:
        """A member's bytes read directly: whole (its CRC-32 checked) or its start."""
        crc, size, offset = self._direct[filename]
        data = os.pread(self._file.fileno(), size if whole else min(size, self._HEADER_BYTES), offset)
        if whole and (len(data) != size or zlib.crc32(data) != crc):
            raise zipfile.BadZipFile("bad CRC-32")
        return data

    def _open(self, filename: str, data: bytes | None):
        return self._archive.open(filename) if data is None else io.BytesIO(data)

    def _read(self, filename: str, whole: bool):
        """A member's array (read-only, read in one call: its CRC-32 is checked when the
        read reaches the member's end), or without ``whole`` its (shape, dtype)."""
        data = None if self._direct is None else self._bytes(filename, whole)
        with self._open(filename, data) as member:
            found = _npy_header(member)
            if found is not None:
                if not whole:
                    return found
                shape, dtype = found
                start = member.tell() if data is not None else 0
                data = data if data is not None else member.read()
                count = int(np.prod(shape, dtype=np.int64))
                if len(data) - start != count * dtype.itemsize:
                    raise ValueError(f"weights member {filename} holds {len(data) - start} bytes, its header says "
                                     f"{count * dtype.itemsize}")
                return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
        if data is not None and not whole and len(data) < self._direct[filename][1]:
            data = self._bytes(filename, True)  # a header longer than the bytes read for it
        with self._open(filename, data) as member:  # numpy's reader for anything else
            if whole:
                return np.lib.format.read_array(member, allow_pickle=False)
            version = np.lib.format.read_magic(member)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = reader(member)
            return shape, dtype

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _direct(path: Path, record: dict) -> tuple | None:
    """(``path`` open, each member's (CRC-32, size, data offset)) from a digest ``record``
    that has them, well formed, while the file's central directory is still the one it
    records (its SHA-256: the names, CRCs, sizes and places of every member); None
    otherwise (the reader then checks the zip's own member list)."""
    members, directory = record.get("members"), record.get("directory")
    if not hasattr(os, "pread") or not isinstance(members, list) or directory is None:
        return None
    found: dict[str, tuple[int, int, int]] = {}
    for member in members:
        if not (isinstance(member, list) and len(member) == 4 and isinstance(member[0], str)
                and all(type(value) is int for value in member[1:])):
            return None
        name, crc, size, offset = member
        if name in found or not (0 <= crc < 1 << 32 and size >= 0 and offset >= 0):
            return None
        found[name] = (crc, size, offset)
    f = open(path, "rb")
    try:
        place = _directory(f)
        if place != directory or any(offset + size > place[0] for _, size, offset in found.values()):
            f.close()
            return None
    except BaseException:
        f.close()
        raise
    return f, found


def _lazy(path: Path) -> tuple[LazyArrays, bytes] | None:
    """(arrays read on use, hash) where ``path`` has a digest file that still matches;
    looked at once per process for each file (again if it or its digest file changed on
    disk): a decode asks it of every installed file, and of each file its weights extend."""
    path = Path(path)
    try:
        found, record = os.stat(path), os.stat(digest_path(path))
    except OSError:
        return None
    return _lazy_checked(str(path), _identity(found), _identity(record))


def _identity(found: os.stat_result) -> tuple[int, ...]:
    """What tells a file's contents changed without reading it: device, inode, size and
    modification time."""
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


@lru_cache(maxsize=16)
def _lazy_checked(path: str, file_identity: tuple[int, ...], digest_identity: tuple[int, ...]
                  ) -> tuple[LazyArrays, bytes] | None:
    """:func:`_lazy` of ``path`` (its digest file beside it, as named) while both files
    keep their identities."""
    path = Path(path)
    try:
        record = json.loads(digest_path(path).read_text())
        digest = bytes.fromhex(record["weights_hash"])
        if len(digest) != 8:
            return None
        direct = _direct(path, record)
        if direct is not None:
            if sum(size for _, size, _ in direct[1].values()) > MAX_WEIGHTS_BYTES:
                direct[0].close()
                return None
            return LazyArrays(path, direct), digest
        if sum(member[2] for member in record["members"]) > MAX_WEIGHTS_BYTES:
            return None
        arrays = LazyArrays(path)
        if [member[:3] for member in record["members"]] != _members(arrays._archive):
            return None
        return arrays, digest
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile):
        return None


def shipped_dir() -> Path:
    """Folder of the shipped weights (the package ``nic.pretrained``)."""
    from importlib.resources import files

    return Path(str(files("nic.pretrained")))


class _Routed(Mapping):
    """A map of arrays that reads each name from one of several (``_split``)."""

    def _split(self, name: str):
        raise NotImplementedError

    def __getitem__(self, name: str) -> np.ndarray:
        arrays, name = self._split(name)
        return arrays[name]

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        arrays, name = self._split(name)
        if hasattr(arrays, "describe"):
            return arrays.describe(name)
        return arrays[name].shape, arrays[name].dtype


class Joined(_Routed):
    """A weights file's arrays with another file's under ``prefix`` (the base transforms
    a hyperprior file names by hash instead of holding them)."""

    def __init__(self, arrays, prefix: str, base):
        self.arrays, self.prefix, self.base = arrays, prefix, base

    def _split(self, name: str):
        if name.startswith(self.prefix):
            return self.base, name[len(self.prefix):]
        return self.arrays, name

    def __contains__(self, name) -> bool:
        arrays, name = self._split(name)
        return name in arrays

    def __iter__(self):
        yield from self.arrays
        for name in self.base:
            yield self.prefix + name

    def __len__(self) -> int:
        return len(self.arrays) + len(self.base)


def _read_and_hash(path: Path) -> tuple[dict[str, np.ndarray], bytes]:
    """(every array, the weights hash) of a weights file read whole."""
    arrays = read_arrays(path.read_bytes())
    return arrays, weights_hash(arrays)


class Extended(_Routed):
    """A weights file's arrays over those of the earlier weights it extends (its config's
    ``extends``): an array it holds itself replaces the earlier file's of that name."""

    def __init__(self, arrays, earlier):
        self.arrays, self.earlier = arrays, earlier

    def _split(self, name: str):
        return (self.arrays if name in self.arrays else self.earlier), name

    def __contains__(self, name) -> bool:
        return name in self.arrays or name in self.earlier

    def __iter__(self):
        yield from self.arrays
        yield from (name for name in self.earlier if name not in self.arrays)

    def __len__(self) -> int:
        return sum(1 for _ in self)


MAX_EXTENDED = 8
"""Most weights files in a chain of extensions (each extending the next) above the file
that extends nothing."""


def _with_base(arrays, folder: Path, lazily: bool, depth: int = 0):
    """``arrays`` completed by the weights they extend (their config's ``extends``, same
    family) or joined with those of the weights file their config names as their base
    (another family's), each looked for beside them, then where :func:`candidates` looks;
    WeightsError if it is not installed."""
    from .families import base_of, extends_of, model_id_of

    try:
        wanted, earlier = base_of(arrays), extends_of(arrays)
        if wanted is None and earlier is None:
            return arrays
        own = model_id_of(arrays)
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    if earlier is not None:
        if wanted is not None:
            raise WeightsError("weights name both a base and earlier weights they extend")
        if depth >= MAX_EXTENDED:
            raise WeightsError(f"weights extend a chain of more than {MAX_EXTENDED} extensions")
        found = _installed_with(earlier, folder, lazily, lambda model_id: model_id == own)
        if found is None:
            raise WeightsError(f"these weights extend weights {earlier.hex()}, which are not installed beside them")
        return Extended(arrays, _with_base(found, folder, lazily, depth + 1))
    # A base is another family's file: skip this family's.
    found = _installed_with(wanted, folder, lazily, lambda model_id: model_id not in (None, own))
    if found is None:
        raise WeightsError(f"these weights share the transforms of weights {wanted.hex()}, which are not "
                           f"installed beside them")
    return Joined(arrays, "base.", found)


def _installed_with(digest: bytes, folder: Path, lazily: bool, family_fits):
    """The arrays of the weights file of hash ``digest`` among those beside ``folder``'s
    file and the installed ones whose model id ``family_fits``, or None."""
    seen = set()
    for candidate in [*sorted(folder.glob("*.npz")), *candidates()]:
        key = candidate.resolve()
        if key in seen or not candidate.is_file():
            continue
        seen.add(key)
        info = candidate.stat()
        if info.st_size > MAX_WEIGHTS_BYTES or not family_fits(_peek_model_id(str(key), info.st_mtime)):
            continue
        try:
            arrays, found = (_lazy(candidate) if lazily else None) or _read_and_hash(candidate)
        except (WeightsError, OSError):
            continue
        if found == digest:
            return arrays
    return None


@lru_cache(maxsize=8)
def _load_path(path: str, mtime: float, coding: bool):
    from .families import from_arrays, load, reads_lazily

    try:
        lazy = _lazy(Path(path)) if coding else None
        if lazy is not None and reads_lazily(lazy[0]):
            arrays, digest = lazy
        else:
            arrays, digest = _read_and_hash(Path(path))
        arrays = _with_base(arrays, Path(path).parent, lazy is not None)
        model = (load if coding else from_arrays)(arrays)
    except WeightsError as exc:
        if str(path) in str(exc):
            raise
        raise WeightsError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    except (TypeError, IndexError, RuntimeError, MemoryError, OverflowError, AttributeError) as exc:
        # A config the network cannot be built from (wrong types, negative or absurd sizes).
        raise WeightsError(f"{path}: not a valid weights file ({type(exc).__name__}: {exc})") from None
    except (OSError, zipfile.BadZipFile) as exc:  # a member read on use is unreadable or fails its CRC
        raise WeightsError(f"{path}: not a valid weights file ({exc})") from None
    return model, digest


def joined_arrays(path: Path | str):
    """A weights file's arrays completed by those of the files it names (its base, the
    weights it extends), each read on use where a digest file allows."""
    path = Path(path)
    load_weights(path)  # the checks of a weights file, with their one-line errors
    lazy = _lazy(path)
    arrays = lazy[0] if lazy is not None else _read_and_hash(path)[0]
    return _with_base(arrays, path.parent, lazy is not None)


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


def candidates(first: str = DEFAULT_NAME) -> list[Path]:
    """Weights files to look in, folder by folder ($NIC_WEIGHTS_DIR, then shipped), in
    each the file named ``first`` first, then the others by name."""
    folders = []
    if os.environ.get(ENV_DIR):
        folders.append(Path(os.environ[ENV_DIR]))
        if not folders[0].is_dir():  # said, not passed over: the shipped weights are not what was asked
            raise WeightsError(f"{ENV_DIR}={os.environ[ENV_DIR]}: no such folder")
    folders.append(shipped_dir())
    found = []
    for folder in folders:
        for name in dict.fromkeys((first, DEFAULT_NAME)):
            if (folder / name).is_file():
                found.append(folder / name)
        found.extend(sorted(p for p in folder.glob("*.npz") if p.name not in (first, DEFAULT_NAME)))
    return found


MAX_CONFIG_BYTES = 1 << 20
"""Largest config member a weights file's model id is peeked from (a JSON of a few hundred bytes)."""


@lru_cache(maxsize=64)
def _peek_model_id(path: str, mtime: float) -> int | None:
    from .families import model_id_of

    try:
        lazy = _lazy(Path(path))
        if lazy is not None:  # a digest file that still holds: its config member, read directly
            arrays = lazy[0]
            if "config" not in arrays or arrays.member_size("config") > MAX_CONFIG_BYTES:
                return None
            return model_id_of({"config": arrays["config"]})
        archive = _archive(path)
        if archive.getinfo("config.npy").file_size > MAX_CONFIG_BYTES:
            return None  # a header that claims a huge array must not be allocated
        with _READING, archive.open("config.npy") as member:
            config = np.lib.format.read_array(member, allow_pickle=False)
        return model_id_of({"config": config})
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError, MemoryError, TypeError, OverflowError,
            AttributeError):
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
    from .families import builtin, model_id_named, name_of

    weightless = builtin(model_id_named(family)) if family is not None else None
    if weightless is not None:
        if path is not None:
            raise WeightsError(f"the {family} family has no weights; leave out --weights")
        return weightless
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
    # In each folder the family's own name first (weights/hyperprior.npz): earlier weights
    # of a family stay installed beside it under other names, so that their files decode.
    found = candidates(f"{family or DEFAULT}.npz")
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
    :func:`load_weights`. A family without weights (nic.families.builtin) needs none."""
    from .families import builtin

    weightless = builtin(model_id)
    if weightless is not None:
        if wanted != weightless[1]:
            raise WeightsError(f"a file of model id {model_id} names weights {wanted.hex()}, but its family has none")
        return weightless
    paths = [Path(path)] if path is not None else candidates()
    for candidate in paths:
        if path is None:
            lazy = _lazy(candidate)
            if lazy is not None and lazy[1] != wanted:
                continue  # its digest file says it is another weights file: do not build its model
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
