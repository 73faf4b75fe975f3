"""Image files read and written a strip of rows at a time, in bounded memory.

Pillow decodes and encodes whole images, so a 20000x20000 picture would need its
full pixel array (1.2 GB as RGB, more inside Pillow) just to be read or written.
This module streams the two formats where that is simple and exact:

* PNG: 8-bit grayscale, RGB, grayscale+alpha and RGBA, not interlaced;
* binary PGM (P5) and PPM (P6) with maxval 255.

:func:`open_rows` gives a :class:`RowReader` only when the rows it yields are exactly
the pixels :func:`nic.images.pixels_from_image` would make of the whole image (same
alpha policy, same EXIF and ICC metadata); for anything else (palette or 16-bit PNG,
tRNS colour keys, an EXIF orientation to apply, APNG, other formats, …) it returns
None and the caller uses the whole-image Pillow path.

PNG rows are inflated with zlib a strip at a time. Unfiltering (Average and Paeth
run sequentially along a row, too slow per pixel in numpy) is left to Pillow's C
decoder: each strip is rewrapped as a stored (level 0) zlib stream whose first row
is the previous, already unfiltered row under filter type 0, and Pillow decodes
that as a tiny image. :func:`row_writer` writes PNG (adaptive per-row filters
chosen with vectorised numpy, as Pillow chooses them, then deflated at Pillow's
settings, by zlib-ng where it is installed, in pieces side by side on nic's threads:
:class:`_Deflate`) and PGM/PPM.
"""

from __future__ import annotations

import operator
import struct
import zlib
from functools import lru_cache
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageColor

from . import engine
from .container import MAX_SECTION
from .images import ORIENTATION, ImageError, pixels_from_image, stored_exif

__all__ = ["RowReader", "RowWriter", "STREAMED_FORMATS", "open_rows", "row_writer"]

STREAMED_FORMATS = frozenset({"PNG", "PPM"})
"""Pillow format names (values of images.OUTPUT_FORMATS) that :func:`row_writer` writes."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STRIP_BYTES = 256 << 10
"""Raw bytes unfiltered per step when reading: working memory is a few times this."""
FILTER_BYTES = 256 << 10
"""Raw bytes filtered per step when writing (~12x this in temporaries; small stays in cache)."""
READ_BLOCK = 1 << 20
"""Compressed bytes read from the file per step."""
IDAT_SIZE = 1 << 20
"""Largest IDAT chunk written."""

DEFLATE_PIECE = 256 << 10
"""Raw bytes of a PNG's zlib stream deflated as one piece (:class:`_Deflate`)."""
MAX_HEADER = 1 << 16
"""A PGM/PPM header (comments included) longer than this is left to Pillow."""
MAX_PNG_INT = 2**31 - 1

_PNG_MODES = {0: ("L", 1), 2: ("RGB", 3), 4: ("LA", 2), 6: ("RGBA", 4)}
_KNOWN_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}
_REFUSED_CHUNKS = {b"tRNS", b"acTL", b"fcTL", b"fdAT"}
"""tRNS is transparency the whole-image path handles; the others make an APNG."""
_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
_PNM_WHITESPACE = b" \t\n\x0b\x0c\r"  # as Pillow's PpmImagePlugin


class _LeaveToPillow(Exception):
    """The file looks sound so far but is not one the streaming readers reproduce exactly."""


def _broken(message: str) -> ImageError:
    """A damaged file: worded like nic.images' errors for files Pillow cannot read."""
    return ImageError(f"cannot read image: {message}")


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is None:
        # No caller limit: Pillow's decompression-bomb error, worded as nic.images words it.
        if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
            raise ImageError("image is too large (decompression bomb limit; raise it with --max-pixels)")
    elif width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} exceeds the limit of {max_pixels} "
                         "pixels (raise it with --max-pixels)")


def _read_exact(stream: BinaryIO, size: int, message: str) -> bytes:
    """``size`` bytes, or ImageError(message) at the end of the file."""
    data = stream.read(size)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while data and got < size:  # raw (unbuffered) files may return short reads
        data = stream.read(size - got)
        parts.append(data)
        got += len(data)
    if got < size:
        raise _broken(message)
    return b"".join(parts)


class RowReader:
    """Rows of an image file, top to bottom, as nic will encode them.

    ``channels`` is 1 (gray) or 3 (RGB), after the input policy; ``exif`` has the
    orientation tag removed, as :func:`nic.images.image_metadata` gives it.
    """

    width: int
    height: int
    channels: int
    icc_profile: bytes | None = None
    exif: bytes | None = None

    def __init__(self, stream: BinaryIO, width: int, height: int, channels: int) -> None:
        self._stream: BinaryIO | None = stream
        self.width, self.height, self.channels = width, height, channels
        self._left = height
        self._error: str | None = None

    def read(self, count: int) -> np.ndarray:
        """The next ``min(count, rows left)`` rows, uint8 (n, width, channels); n is 0 at the end."""
        if self._stream is None:
            raise ValueError("the row reader is closed")
        if self._error is not None:  # the decoding state is unusable after an error
            raise ImageError(self._error)
        count = operator.index(count)
        if count < 0:
            raise ValueError(f"cannot read {count} rows")
        n = min(count, self._left)
        out = np.empty((n, self.width, self.channels), dtype=np.uint8)
        if n:
            try:
                self._read_into(out)
                self._left -= n
            except ImageError as exc:
                self._error = str(exc)
                raise
        return out

    def _read_into(self, out: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Forget the stream (the caller closes it) and the decoding state."""
        self._stream = None

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_rows(stream: BinaryIO, background: str | None = None, max_pixels: int | None = None
              ) -> RowReader | None:
    """A row reader for a simple PNG, PGM or PPM in ``stream`` (seekable, opened and
    closed by the caller), or None (stream position unchanged) when the whole-image
    Pillow path must read it.

    Raises ImageError for a broken file, or one of more than ``max_pixels`` pixels
    (None: Pillow's decompression-bomb limit, 2 x Image.MAX_IMAGE_PIXELS, as the
    whole-image path applies it). A PNG's chunks up to the image data are checked,
    CRCs included, before this returns, as Pillow checks them when it opens a file.
    From the image data on, this is exactly as lenient as Pillow's loader, so that a
    file gives the same pixels, or fails, on both paths: IDAT CRCs and data after the
    last row are not checked, and a problem after the image data that shows now
    (truncation, a bad CRC, no IEND) leaves the file to Pillow (None). zlib errors and
    image data that ends before the last row raise ImageError while rows are read.
    """
    seekable = getattr(stream, "seekable", None)
    if seekable is None or not seekable():
        return None
    start = stream.tell()
    head = stream.read(8)
    reader: RowReader | None = None
    try:
        if head == PNG_SIGNATURE:
            reader = _open_png(stream, start, background, max_pixels)
        elif len(head) >= 3 and head[:2] in (b"P5", b"P6") and head[2:3] in _PNM_WHITESPACE:
            reader = _open_pnm(stream, start, max_pixels)
    except _LeaveToPillow:
        pass
    finally:
        if reader is None:
            stream.seek(start)
    return reader


# ---------------------------------------------------------------------------- PNG


class _PngScan:
    """What a pass over the chunk list learned."""

    def __init__(self) -> None:
        self.first_idat = 0
        self.icc_profile: bytes | None = None
        self.exif: bytes | None = None


def _open_png(stream: BinaryIO, start: int, background: str | None, max_pixels: int | None
              ) -> RowReader:
    size = stream.seek(0, 2) - start
    stream.seek(start + 8)
    if size < 8 + 25:
        raise _broken("PNG is truncated in IHDR")
    length, kind = struct.unpack(">I4s", stream.read(8))
    if kind != b"IHDR" or length != 13:
        raise _broken("PNG is corrupt: it does not start with a valid IHDR chunk")
    body = stream.read(13)
    _check_crc(stream, kind, zlib.crc32(body, zlib.crc32(kind)))
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if not (0 < width <= MAX_PNG_INT and 0 < height <= MAX_PNG_INT):
        raise _broken(f"PNG header is invalid: size {width}x{height}")
    # Same check and wording as the whole-image path, before any pixel data is read.
    _check_pixels(width, height, max_pixels)
    if (depth != 8 or colour not in _PNG_MODES or compression != 0 or filtering != 0
            or interlace != 0):
        raise _LeaveToPillow
    mode, stored = _PNG_MODES[colour]
    channels = {1: 1, 2: 1, 3: 3, 4: 3}[stored]
    if colour == 4 and background is not None:
        try:
            rgb = ImageColor.getrgb(background)[:3]
        except ValueError:
            rgb = (0, 0, 0)  # refused per strip, only if a pixel is transparent, as the whole path does
        if len(set(rgb)) > 1:
            # The whole-image path gives RGB when a pixel is transparent and gray when
            # none is: unknowable before the last row, so that path must do it.
            raise _LeaveToPillow
    scan = _scan_png(stream, start, size)
    stream.seek(scan.first_idat)
    reader = _PngReader(stream, width, height, channels, mode, stored, background)
    reader.icc_profile, reader.exif = scan.icc_profile, scan.exif
    return reader


def _check_crc(stream: BinaryIO, kind: bytes, crc: int) -> None:
    stored = _read_exact(stream, 4, f"PNG is truncated in {kind.decode('latin-1')}")
    if struct.unpack(">I", stored)[0] != crc & 0xFFFFFFFF:
        raise _broken(f"PNG chunk {kind.decode('latin-1')} is corrupt (CRC mismatch)")


def _read_chunk_body(stream: BinaryIO, kind: bytes, length: int) -> bytes:
    """A chunk's body (length already bounded by the caller), its CRC checked."""
    body = _read_exact(stream, length, f"PNG is truncated in {kind.decode('latin-1')}")
    _check_crc(stream, kind, zlib.crc32(body, zlib.crc32(kind)))
    return body


def _scan_png(stream: BinaryIO, start: int, size: int) -> _PngScan:
    """Walk all chunks after IHDR up to IEND, seeking past IDAT bodies, so that
    metadata after the image data is seen too (Pillow reads it when it loads).

    Up to the image data a problem is an ImageError: Pillow refuses such files when it
    opens them. From the first IDAT chunk on it is _LeaveToPillow: Pillow's loader does
    not check IDAT CRCs and skips what it cannot read after the image data, so the
    whole-image path decides (it may well read the pixels)."""
    scan = _PngScan()
    pos = start + 8 + 25
    end = start + size
    idat_run = "before"  # before, in, after the IDAT chunks
    seen: set[bytes] = set()
    while True:
        try:
            length, kind = _chunk_header(stream, pos, start, end)
            if kind == b"IEND":
                break  # Pillow reads neither its body nor its CRC
            if kind == b"IDAT":
                if idat_run == "after":
                    raise _LeaveToPillow  # split IDAT runs: Pillow decodes only the first
                if idat_run == "before":
                    scan.first_idat = pos
                idat_run = "in"
            else:
                if idat_run == "in":
                    idat_run = "after"
                if (kind in _REFUSED_CHUNKS or kind == b"IHDR" or (kind in seen and kind in (b"iCCP", b"eXIf"))
                        or (kind[0] < 97 and kind not in _KNOWN_CRITICAL)):
                    raise _LeaveToPillow
                seen.add(kind)
                _read_ancillary(stream, scan, kind, length, check_crc=idat_run == "before")
        except ImageError:
            if idat_run == "before":
                raise
            raise _LeaveToPillow from None
        pos += 12 + length
    if idat_run == "before":
        raise _broken("PNG has no image data (no IDAT chunk)")
    return scan


def _chunk_header(stream: BinaryIO, pos: int, start: int, end: int) -> tuple[int, bytes]:
    """(length, type) of the chunk at ``pos``, checked against the file's end."""
    stream.seek(pos)
    if pos + 12 > end:
        raise _broken("PNG is truncated (it ends before its IEND chunk)")
    length, kind = struct.unpack(">I4s", stream.read(8))
    if not all(65 <= c <= 90 or 97 <= c <= 122 for c in kind):
        raise _broken(f"PNG is corrupt: invalid chunk type at byte {pos - start}")
    name = kind.decode("ascii")
    if length > MAX_PNG_INT:
        raise _broken(f"PNG chunk {name} is corrupt (invalid length)")
    # A truncated IDAT shows as a missing IEND on the next turn, past the image data:
    # Pillow may still get every row from it (when only the adler32 or CRC is cut).
    if kind != b"IDAT" and pos + 12 + length > end:
        raise _broken(f"PNG is truncated in {name}")
    return length, kind


def _read_ancillary(stream: BinaryIO, scan: _PngScan, kind: bytes, length: int, check_crc: bool) -> None:
    """Keep what an ancillary chunk adds to the image (ICC profile, EXIF); refuse what the
    streaming reader cannot reproduce; check CRCs where Pillow does (before IDAT)."""
    name = kind.decode("ascii")
    if kind == b"iCCP":
        if length > MAX_SECTION + 4096:
            raise _broken(f"PNG ICC profile is larger than {MAX_SECTION} bytes")
        scan.icc_profile = _icc_profile(_read_chunk_body(stream, kind, length))
    elif kind == b"eXIf":
        if length > MAX_SECTION:
            raise _LeaveToPillow  # larger than nic keeps: the whole path says what to do
        scan.exif = _exif_without_orientation(_read_chunk_body(stream, kind, length))
    elif kind in _TEXT_CHUNKS:
        head = _read_exact(stream, min(length, 80), f"PNG is truncated in {name}")
        keyword = head.split(b"\0", 1)[0].lower()
        # Pillow takes EXIF (and an orientation) from "Raw profile type exif" and
        # XMP text chunks too; such files take the whole-image path.
        if b"exif" in keyword or b"xmp" in keyword:
            raise _LeaveToPillow
        if check_crc:
            _rest_of_chunk(stream, kind, length - len(head), zlib.crc32(head, zlib.crc32(kind)))
    elif check_crc:
        # Pillow checks the CRCs of all chunks before IDAT, so this does too.
        _rest_of_chunk(stream, kind, length, zlib.crc32(kind))


def _rest_of_chunk(stream: BinaryIO, kind: bytes, left: int, crc: int) -> None:
    """Read the last ``left`` bytes of a chunk body a block at a time, then check its
    CRC (``crc`` covers what came before)."""
    while left:
        block = _read_exact(stream, min(left, READ_BLOCK), f"PNG is truncated in {kind.decode('latin-1')}")
        crc = zlib.crc32(block, crc)
        left -= len(block)
    _check_crc(stream, kind, crc)


def _icc_profile(body: bytes) -> bytes | None:
    """The profile of an iCCP chunk body, decoded as Pillow does it (a zlib error
    gives no profile), but bounded by MAX_SECTION rather than Pillow's 1 MiB."""
    sep = body.find(b"\0")
    if sep < 0 or sep + 1 >= len(body) or body[sep + 1] != 0:
        raise _LeaveToPillow  # malformed: Pillow's own reading of it decides
    inflater = zlib.decompressobj()
    try:
        profile = inflater.decompress(body[sep + 2:], MAX_SECTION + 1)
    except zlib.error:
        return None
    if len(profile) > MAX_SECTION or inflater.unconsumed_tail:
        raise _broken(f"PNG ICC profile is larger than {MAX_SECTION} bytes")
    return profile or None


def _exif_without_orientation(body: bytes) -> bytes | None:
    """EXIF bytes without the orientation tag and a TIFF's layout tags, None when nothing
    is left, as images.image_metadata makes them. An orientation to apply, or EXIF that Pillow
    fails to parse (it then half-loads it), leaves the file to the whole-image path."""
    exif = Image.Exif()
    try:
        exif.load(b"Exif\x00\x00" + body)  # as PngImagePlugin stores it in info["exif"]
        orientation = exif.get(ORIENTATION)
        data = stored_exif(exif)
    except Exception:  # any parse failure: Pillow's own handling decides
        raise _LeaveToPillow from None
    if orientation not in (None, 1):
        raise _LeaveToPillow
    return data


class _IdatInflater:
    """The zlib stream spread over consecutive IDAT chunks, inflated on demand, as
    Pillow's loader reads it: chunk CRCs are skipped, not checked, and nothing after
    the last row is read."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._left = 0  # body bytes left in the current IDAT chunk
        self._in_chunk = False  # its CRC is still to be skipped
        self._more = True  # IDAT chunks may follow
        self._zlib = zlib.decompressobj()

    def _next_input(self) -> bytes:
        """The next block of compressed data, b"" after the last IDAT chunk."""
        while self._left == 0:
            if not self._more:
                return b""
            if self._in_chunk:
                _read_exact(self._stream, 4, "PNG is truncated in IDAT")
            header = _read_exact(self._stream, 8, "PNG is truncated in IDAT")
            length, kind = struct.unpack(">I4s", header)
            if kind != b"IDAT":
                self._more = False
                return b""
            self._left, self._in_chunk = length, True
        block = _read_exact(self._stream, min(self._left, READ_BLOCK), "PNG is truncated in IDAT")
        self._left -= len(block)
        return block

    def _inflate(self, data: bytes, limit: int) -> bytes:
        try:
            return self._zlib.decompress(data, limit)
        except zlib.error as exc:
            raise _broken(f"PNG image data is corrupt (zlib: {exc})") from None

    def read(self, size: int) -> bytes:
        """Exactly ``size`` inflated bytes (size > 0); ImageError if the data ends first."""
        parts = []
        have = 0
        while have < size:
            if self._zlib.eof:
                raise _broken("PNG image data is too short for the image size")
            data = self._zlib.unconsumed_tail or self._next_input()
            # max_length: never more output than the rows need, whatever the stream holds.
            out = self._inflate(data, size - have)
            if out:
                parts.append(out)
                have += len(out)
            elif not data:
                raise _broken("PNG image data ends before the last row (truncated zlib stream)")
        return b"".join(parts)


class _PngReader(RowReader):
    def __init__(self, stream: BinaryIO, width: int, height: int, channels: int, mode: str,
                 stored: int, background: str | None) -> None:
        super().__init__(stream, width, height, channels)
        self._mode = mode
        self._stored = stored
        self._background = background
        self._stride = width * stored
        self._prev = bytes(self._stride)  # the row above the first one is all zeros
        self._strip = max(1, STRIP_BYTES // (self._stride + 1))
        self._inflater = _IdatInflater(stream)
        self._row = 0

    def _read_into(self, out: np.ndarray) -> None:
        done = 0
        while done < len(out):
            k = min(self._strip, len(out) - done)
            raw = self._inflater.read(k * (self._stride + 1))
            filters = np.frombuffer(raw, dtype=np.uint8)[:: self._stride + 1]
            if filters.max() > 4:
                bad = int(np.argmax(filters > 4))
                raise _broken(f"PNG image data is corrupt (row {self._row + bad} has unknown "
                                 f"filter type {filters[bad]})")
            out[done:done + k] = self._unfilter(raw, k)
            done += k
            self._row += k

    def _unfilter(self, raw: bytes, k: int) -> np.ndarray:
        """Pixels of k filtered rows, by Pillow's PNG decoder on a stored zlib stream
        that starts with the previous row, unfiltered, under filter type 0."""
        packer = zlib.compressobj(0)
        stored = b"".join((packer.compress(b"\0"), packer.compress(self._prev), packer.compress(raw),
                           packer.flush()))
        try:
            im = Image.frombytes(self._mode, (self.width, k + 1), stored, "zip", self._mode)
        except (ValueError, OSError) as exc:  # not expected: filter types are checked above
            raise _broken(f"PNG image data is corrupt ({exc})") from None
        rows = np.asarray(im)
        self._prev = rows[-1].tobytes()
        if self._stored in (1, 3):
            return rows[1:].reshape(k, self.width, self.channels)
        # Alpha: the whole-image policy per strip (it is per pixel, so the result is
        # the same): opaque alpha dropped, transparency flattened onto the background
        # or refused with the same message.
        return pixels_from_image(im.crop((0, 1, self.width, k + 1)), self._background)

    def close(self) -> None:
        super().close()
        self._inflater = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------- PGM / PPM


def _pnm_token(stream: BinaryIO, budget: list[int]) -> int:
    """One header number, read as Pillow's PpmImagePlugin reads tokens (comments run
    to CR or LF); a token that is not plain digits, or a header over MAX_HEADER bytes,
    leaves the file to Pillow."""
    token = b""
    while len(token) <= 10:
        c = stream.read(1)
        budget[0] -= 1
        if budget[0] < 0:
            raise _LeaveToPillow
        if not c:
            break
        if c in _PNM_WHITESPACE:
            if not token:
                continue
            break
        if c == b"#":
            while True:
                c = stream.read(1)
                budget[0] -= 1
                if budget[0] < 0:
                    raise _LeaveToPillow
                if c in (b"", b"\r", b"\n"):
                    break
            continue
        token += c
    if not token or len(token) > 10 or not token.isdigit():
        raise _LeaveToPillow  # Pillow raises, or parses oddities (+5, 1_0) its own way
    return int(token)


def _open_pnm(stream: BinaryIO, start: int, max_pixels: int | None) -> RowReader:
    size = stream.seek(0, 2) - start
    stream.seek(start)
    magic = stream.read(3)[:2]
    channels = 1 if magic == b"P5" else 3
    name = "PGM" if channels == 1 else "PPM"
    budget = [MAX_HEADER]
    width, height, maxval = (_pnm_token(stream, budget) for _ in range(3))
    if maxval != 255:
        raise _LeaveToPillow
    if width == 0 or height == 0:
        raise _broken(f"{name} header is invalid: size {width}x{height}")
    _check_pixels(width, height, max_pixels)
    offset = stream.tell()
    stride = width * channels
    if size - (offset - start) < stride * height:
        raise _broken(f"{name} is truncated: {stride * height} bytes of pixels expected, "
                         f"{size - (offset - start)} present")
    return _PnmReader(stream, width, height, channels, name)


class _PnmReader(RowReader):
    def __init__(self, stream: BinaryIO, width: int, height: int, channels: int, name: str) -> None:
        super().__init__(stream, width, height, channels)
        self._name = name

    def _read_into(self, out: np.ndarray) -> None:
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            count = self._stream.readinto(view[got:])  # type: ignore[union-attr]
            if not count:
                raise _broken(f"{self._name} is truncated in its pixel data")
            got += count


# ---------------------------------------------------------------------------- writers


class RowWriter:
    """Writes an image of known size to ``stream`` a strip of rows at a time: call
    :meth:`write` with the rows in order, then :meth:`close` (the caller closes the
    stream). Subclasses know the format; :func:`row_writer` picks one."""

    def __init__(self, stream: BinaryIO, width: int, height: int, channels: int,
                 icc_profile: bytes | None = None, exif: bytes | None = None) -> None:
        width, height = operator.index(width), operator.index(height)
        if width <= 0 or height <= 0:
            raise ValueError(f"cannot write an image of {width}x{height}")
        if channels not in (1, 3):
            raise ValueError(f"cannot write {channels} channels (1 or 3)")
        self._stream = stream
        self.width, self.height, self.channels = width, height, channels
        self.icc_profile, self.exif = icc_profile, exif
        self.rows_written = 0
        self._closed = False
        self._begin()

    def write(self, rows: np.ndarray) -> None:
        """Append rows, uint8 (n, width, channels)."""
        if self._closed:
            raise ValueError("the row writer is closed")
        shape = (self.width, self.channels)
        if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 3 or rows.shape[1:] != shape:
            got = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
            raise ValueError(f"rows must be uint8 of shape (n, {self.width}, {self.channels}), not {got}")
        if self.rows_written + len(rows) > self.height:
            raise ValueError(f"{self.rows_written + len(rows)} rows written to an image of {self.height}")
        if len(rows):
            self._rows(np.ascontiguousarray(rows))
            self.rows_written += len(rows)

    def close(self) -> None:
        """Finish the file; ValueError if rows are missing."""
        if self._closed:
            return
        if self.rows_written < self.height:
            raise ValueError(f"only {self.rows_written} of {self.height} rows were written")
        self._end()
        self._closed = True

    def _begin(self) -> None:
        raise NotImplementedError

    def _rows(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        pass


def row_writer(fmt: str, stream: BinaryIO, width: int, height: int, channels: int,
               icc_profile: bytes | None = None, exif: bytes | None = None) -> RowWriter | None:
    """A row writer for a Pillow format name ("PNG", "PPM"), None for the others."""
    if fmt == "PNG":
        return _PngWriter(stream, width, height, channels, icc_profile, exif)
    if fmt == "PPM":
        return _PnmWriter(stream, width, height, channels)
    return None


class _PnmWriter(RowWriter):
    """Binary PGM (P5) for gray, PPM (P6) for RGB, header as Pillow writes it; no metadata."""

    def _begin(self) -> None:
        magic = b"P5" if self.channels == 1 else b"P6"
        self._stream.write(b"%s\n%d %d\n255\n" % (magic, self.width, self.height))

    def _rows(self, rows: np.ndarray) -> None:
        self._stream.write(memoryview(rows).cast("B"))


class _PngWriter(RowWriter):
    """8-bit gray or RGB PNG; iCCP and eXIf chunks as Pillow writes them."""

    def _begin(self) -> None:
        if self.width > MAX_PNG_INT or self.height > MAX_PNG_INT:
            raise ValueError(f"PNG cannot hold an image of {self.width}x{self.height}")
        self._bpp = self.channels
        self._stride = self.width * self.channels
        self._prev = np.zeros(self._stride, dtype=np.uint8)  # the row above the first one
        self._strip = max(1, FILTER_BYTES // self._stride)
        self._deflate = _Deflate()
        self._pending = bytearray()
        self._stream.write(PNG_SIGNATURE)
        colour = 0 if self.channels == 1 else 2
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, colour, 0, 0, 0))
        if self.icc_profile:
            self._chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(self.icc_profile))
        if self.exif:
            exif = self.exif[6:] if self.exif.startswith(b"Exif\x00\x00") else self.exif
            self._chunk(b"eXIf", exif)

    def _chunk(self, kind: bytes, data: bytes | bytearray) -> None:
        self._stream.write(struct.pack(">I", len(data)) + kind)
        self._stream.write(data)
        self._stream.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))

    def _rows(self, rows: np.ndarray) -> None:
        flat = rows.reshape(len(rows), self._stride)
        for top in range(0, len(flat), self._strip):
            strip = flat[top:top + self._strip]
            self._pending += self._deflate.compress(_filter_rows(strip, self._prev, self._bpp))
            self._prev = strip[-1].copy()
            self._flush(IDAT_SIZE)

    def _flush(self, at_least: int) -> None:
        """Write IDAT chunks of IDAT_SIZE while ``at_least`` bytes are pending."""
        while self._pending and len(self._pending) >= at_least:
            data = self._pending[:IDAT_SIZE]
            del self._pending[:IDAT_SIZE]
            self._chunk(b"IDAT", data)

    def _end(self) -> None:
        self._pending += self._deflate.flush()
        self._flush(1)
        self._chunk(b"IEND", b"")


@lru_cache(maxsize=1)
def _deflater():
    """The module whose compressobj deflates PNG rows: zlib-ng's, 2-3x faster than zlib's
    at the same level, its files within a few per cent of zlib's size (decoded Kodak
    photos 1-3 % smaller; noise up to 6 % larger: docs/speed.md); zlib where zlib-ng is
    not installed. Either stream is standard deflate."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return zlib
    return zlib_ng


class _Deflate:
    """A zlib stream at Pillow's settings (level 6, memLevel 9, Z_FILTERED, so files come
    out as small as Pillow's) made of pieces of DEFLATE_PIECE raw bytes, each deflated
    on its own, primed with the 32 KiB before it and ended by a sync flush (pigz's
    scheme): the pieces deflate side by side on nic's threads (the deflater releases the
    GIL), and the bytes are the same for any thread count (given one deflater: see
    :func:`_deflater`). kodim01: 101 ms on one thread with zlib, ~35 ms with zlib-ng."""

    WINDOW = 1 << 15

    def __init__(self) -> None:
        self._raw = bytearray()  # not deflated yet
        self._window = b""  # the WINDOW bytes before it
        self._adler = 1
        self._begun = False

    def compress(self, data: bytes) -> bytes:
        self._raw += data
        whole = len(self._raw) // DEFLATE_PIECE
        return self._pieces(whole * DEFLATE_PIECE, last=False) if whole >= engine.threads() else b""

    def flush(self) -> bytes:
        return self._pieces(len(self._raw), last=True) + struct.pack(">I", self._adler)

    def _pieces(self, size: int, last: bool) -> bytes:
        data = bytes(self._raw[:size])
        del self._raw[:size]
        before = self._window + data  # a piece's dictionary: the WINDOW bytes before it
        starts = list(range(0, size, DEFLATE_PIECE)) or [0]
        out: list[bytes] = [b""] * len(starts)
        deflater = _deflater()

        def piece(n: int) -> None:
            start = starts[n]
            prior = memoryview(before)[max(0, len(self._window) + start - self.WINDOW):len(self._window) + start]
            options = {"zdict": prior} if len(prior) else {}
            deflate = deflater.compressobj(6, deflater.DEFLATED, -15, 9, deflater.Z_FILTERED, **options)
            end = deflater.Z_FINISH if last and n == len(starts) - 1 else deflater.Z_SYNC_FLUSH
            out[n] = deflate.compress(memoryview(data)[start:start + DEFLATE_PIECE]) + deflate.flush(end)

        engine.parallel(piece, len(starts))
        self._adler = zlib.adler32(data, self._adler)
        self._window = before[-self.WINDOW:]
        head = b"" if self._begun else b"\x78\x9c"  # deflate, 32 KiB window, default level
        self._begun = True
        return head + b"".join(out)


def _filter_rows(rows: np.ndarray, prev: np.ndarray, bpp: int) -> bytes:
    """Rows (k, stride) filtered for PNG, each with the filter byte first. Per row the
    filter whose output has the smallest sum of |signed bytes| wins, tried in Pillow's
    order (None, Up, Sub, then Average, which Pillow only tries with optimize=True,
    then Paeth; the first minimum is kept). Encoding filters only need the original
    pixels, so all rows are done at once; uint8 arithmetic wraps modulo 256 as PNG's."""
    k, stride = rows.shape
    candidates = np.empty((5, k, stride), dtype=np.uint8)
    up = np.empty_like(rows)
    up[0] = prev
    up[1:] = rows[:-1]
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    candidates[0] = rows
    np.subtract(rows, up, out=candidates[1])
    np.subtract(rows, left, out=candidates[2])
    average = candidates[3]  # floor((left + up) / 2) without overflowing uint8
    np.bitwise_and(left, up, out=average)
    average &= 1
    half = left >> 1
    average += half
    np.right_shift(up, 1, out=half)
    average += half
    np.subtract(rows, average, out=average)
    # Paeth: pa = |up - up_left|, pb = |left - up_left|, pc = |pa + pb| (signed sums).
    paeth = candidates[4]
    paeth[:, :bpp] = 0
    paeth[:, bpp:] = up[:, :-bpp]  # up_left, the prediction when neither test below holds
    up_left = paeth.astype(np.int16)
    pa = up.astype(np.int16)
    pa -= up_left
    pb = left.astype(np.int16)
    pb -= up_left
    pc = np.add(pa, pb)
    np.abs(pc, out=pc)
    np.abs(pa, out=pa)
    np.abs(pb, out=pb)
    use_left = np.less_equal(pa, pb)
    use_left &= pa <= pc
    np.copyto(paeth, up, where=pb <= pc)
    np.copyto(paeth, left, where=use_left)
    np.subtract(rows, paeth, out=paeth)
    magnitude = np.negative(candidates)  # |signed byte| = min(v, 256 - v)
    np.minimum(candidates, magnitude, out=magnitude)
    cost = magnitude.sum(axis=2, dtype=np.uint32 if stride < 2**24 else np.uint64)
    best = cost.argmin(axis=0)
    out = np.empty((k, stride + 1), dtype=np.uint8)
    out[:, 0] = np.array([0, 2, 1, 3, 4], dtype=np.uint8)[best]  # PNG filter type numbers
    out[:, 1:] = candidates[best, np.arange(k)]
    return out.tobytes()
