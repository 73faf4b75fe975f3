"""The .nic file format, versions 1 and 2.

All integers are little-endian. A file is a fixed 38-byte header, the range-coded
payload, the payload's CRC, then zero or more sections.

| offset | size | field            | meaning                                                    |
|-------:|-----:|------------------|------------------------------------------------------------|
| 0      | 4    | magic            | ``89 4E 49 43`` (0x89 "NIC"): the high bit catches 7-bit channels |
| 4      | 1    | version          | container format version: 1 (one substream) or 2 (several) |
| 5      | 1    | model id         | the model family (:mod:`nic.families`): 1 = factorized, 2 = hyperprior, 3 = pixels |
| 6      | 1    | quality          | 1..Q, the weights' quality count (8 for the shipped ones)  |
| 7      | 1    | colour layout    | 1 = RGB, 2 = grayscale (decoded to one channel)            |
| 8      | 4    | width            | pixels, ≥ 1                                                |
| 12     | 4    | height           | pixels, ≥ 1                                                |
| 16     | 8    | weights hash     | first 8 bytes of the SHA-256 of the weights' tensors (zero: a family without weights) |
| 24     | 2    | latent channels  | M                                                          |
| 26     | 2    | latent rows      | ceil(height / 16)                                          |
| 28     | 2    | latent columns   | ceil(width / 16)                                           |
| 30     | 4    | payload length   | bytes, a multiple of 4                                     |
| 34     | 4    | header CRC       | CRC-32 of bytes 0..33                                      |
| 38     | n    | payload          | range-coded latents (:mod:`nic.coding`), 32-bit LE words   |
| 38+n   | 4    | payload CRC      | CRC-32 of the payload                                      |

In version 1 (what the factorized family writes, unchanged since the first release)
the payload is one substream: the latents ŷ, of the header's latent shape. In
version 2 the payload is a list of substreams, each range-coded on its own, with its
own escapes (the hyperprior family writes ẑ, then ŷ, after an overlay's tile map and
pixel substreams where it has pixel tiles over the model's, :mod:`nic.overlay`; the
pixels family its step, predictor and tables, then the pixels' indices, range-coded, or
in its dictionary codings the quantized pixel values as one LZMA2 stream, :mod:`nic.pixels`):

| offset | size   | field        | meaning                                                 |
|-------:|-------:|--------------|---------------------------------------------------------|
| 0      | 4      | count        | substreams, 1 .. MAX_SUBSTREAMS                         |
| 4      | 16·count | directory  | per substream: name (4 ASCII letters), channels, rows, columns (3 × u16), 2 zero bytes, length in bytes (u32, a multiple of 4) |
| …      | …      | substreams   | their bytes, in directory order, back to back           |

A substream's grid is never finer than the latent grid (rows and columns at most the
header's); which names and shapes a family expects is the family's to check
(:mod:`nic.families`). A version-1 reader refuses version-2 files by their version byte.

Sections (how the format grows without a new version): each is a 4-byte ASCII
type, a 4-byte length (at most 16 MiB), the data and a CRC-32 over type and data.
As in PNG, a type whose first letter is lowercase is *ancillary*: a reader that does
not know it skips it; an unknown uppercase (*critical*) type makes the file
unreadable, with a message naming it. Versions 1 and 2 define three ancillary sections:

| type (stable id) | content                                                          |
|------------------|------------------------------------------------------------------|
| `iCCP`           | the source's ICC colour profile, verbatim; written only where its colour space is the pixels' (RGB, or GRAY for one channel: `profile_for`) |
| `eXIf`           | the source's EXIF block (orientation already applied, tag reset) |
| `gRGB`           | empty: the grayscale image was an RGB source whose pixels were all gray; decode it to RGB (three equal channels). A reader that skips it writes the same pixels as one channel |

One critical section is defined (version 2, the hyperprior family):

| type | content |
|------|---------|
| `STEP` | 3 bytes: the quantization step Δ in 1/256 (u16, 64..1024) and a scale-table shift (i8, −32..32). The residuals are k = round((y − μ)/Δ), coded with scale index t − shift, and ŷ = μ + k·Δ: a quality between the trained ones (`-q 3.5`). Without it Δ = 1 and the shift 0 |

A future feature that a reader may ignore (say, a thumbnail) gets a new ancillary
type; one that changes how pixels decode gets a critical type, so version-1 readers
refuse such files predictably instead of decoding them wrongly. Only a change to the
fixed header or to the payload's layout needs a new format version (version 2: substreams). Any byte after the payload CRC that does
not parse as a section is an error.

Every check happens before anything is allocated from a header field: dimensions
against a pixel limit, latent shape against the dimensions, payload length against
the pixels and the bytes actually present. No I/O here: bytes in, bytes out.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"\x89NIC"
VERSION = 1
VERSION_SUBSTREAMS = 2
VERSIONS = (VERSION, VERSION_SUBSTREAMS)
HEADER = struct.Struct("<4sBBBBII8sHHHI")  # without its CRC
HEADER_SIZE = HEADER.size + 4  # 38
SECTION_HEAD = struct.Struct("<4sI")
SUBSTREAM_ENTRY = struct.Struct("<4sHHHHI")  # the second-to-last field is reserved: 0
MAX_SUBSTREAMS = 16

COLOUR_RGB = 1
COLOUR_GRAY = 2
COLOUR_NAMES = {COLOUR_RGB: "RGB", COLOUR_GRAY: "grayscale"}

DEFAULT_MAX_PIXELS = 2 * 89_478_485
"""Like Pillow's decompression-bomb error threshold (2 x its warning limit)."""

MAX_SECTION = 16 * 1024 * 1024
"""Largest section body (an ICC profile or EXIF block is far smaller)."""

SECTION_ICC = b"iCCP"
SECTION_EXIF = b"eXIf"
SECTION_GRAY_RGB = b"gRGB"
SECTION_STEP = b"STEP"
CRITICAL_SECTIONS = (SECTION_STEP,)
"""Critical section types this nic reads (a file with any other is refused)."""

STEP = struct.Struct("<Hb")
UNIT_STEP = (256, 0)
"""(Δ·256, table shift) of a file without a STEP section: residuals in units of 1."""
STEP_SIZES = (64, 1024)
STEP_SHIFTS = (-32, 32)


def pack_step(size: int, shift: int) -> bytes:
    """The body of a STEP section: the quantization step Δ in 1/256 (u16) and the shift of
    the scale-table index (i8)."""
    return STEP.pack(size, shift)


def unpack_step(body: bytes) -> tuple[int, int]:
    """(size, shift) of a STEP section; FormatError if malformed or out of range."""
    if len(body) != STEP.size:
        raise FormatError(f"section STEP has {len(body)} bytes, expected {STEP.size}")
    size, shift = STEP.unpack(body)
    if not STEP_SIZES[0] <= size <= STEP_SIZES[1] or not STEP_SHIFTS[0] <= shift <= STEP_SHIFTS[1]:
        raise FormatError(f"section STEP is out of range (step {size}/256, table shift {shift})")
    return size, shift

MAX_BITS_PER_PIXEL = 64
"""No honest payload comes near this; larger claims are refused before reading."""

SECTIONS_LIMIT = 64 << 20
"""Most bytes of sections a reader takes after the payload (each is ≤ MAX_SECTION)."""


class FormatError(ValueError):
    """The bytes are not a valid .nic file; the message says what is wrong."""


@dataclass(frozen=True)
class Header:
    model_id: int
    quality: int
    colour: int
    width: int
    height: int
    weights_hash: bytes
    latent_shape: tuple[int, int, int]
    payload_length: int
    version: int = VERSION

    def pack(self) -> bytes:
        c, h, w = self.latent_shape
        fixed = HEADER.pack(MAGIC, self.version, self.model_id, self.quality, self.colour,
                            self.width, self.height, self.weights_hash, c, h, w, self.payload_length)
        return fixed + struct.pack("<I", zlib.crc32(fixed))


@dataclass(frozen=True)
class Substream:
    """One range-coded stream of the payload: its name, the shape of the integers it
    codes (channels, rows, columns) and its bytes (a multiple of 4)."""

    name: bytes
    shape: tuple[int, int, int]
    data: bytes


@dataclass(frozen=True)
class Container:
    header: Header
    payload: bytes
    sections: list[tuple[bytes, bytes]] = field(default_factory=list)  # ancillary ones kept

    def substreams(self) -> list[Substream]:
        """The payload as substreams: version 1's is one, ``yhat`` of the latent shape."""
        if self.header.version == VERSION:
            return [Substream(b"yhat", self.header.latent_shape, self.payload)]
        return unpack_substreams(self.payload, self.header)


def pack_substreams(substreams: list[Substream]) -> list:
    """A version-2 payload as buffers to write in order (the substreams are not copied)."""
    if not 1 <= len(substreams) <= MAX_SUBSTREAMS:
        raise ValueError(f"a payload holds 1..{MAX_SUBSTREAMS} substreams")
    parts: list = [struct.pack("<I", len(substreams))]
    for stream in substreams:
        size = memoryview(stream.data).nbytes
        if size % 4 or len(stream.name) != 4 or not stream.name.isalpha():
            raise ValueError(f"invalid substream {stream.name!r}")
        parts.append(SUBSTREAM_ENTRY.pack(stream.name, *stream.shape, 0, size))
    return parts + [memoryview(stream.data).cast("B") for stream in substreams]


def unpack_substreams(payload: bytes, header: Header) -> list[Substream]:
    """Parse a version-2 payload (its CRC already checked); FormatError naming the problem."""
    if len(payload) < 4:
        raise FormatError("payload is too short for its substream directory")
    (count,) = struct.unpack_from("<I", payload)
    if not 1 <= count <= MAX_SUBSTREAMS:
        raise FormatError(f"payload claims {count} substreams (1..{MAX_SUBSTREAMS} allowed)")
    offset = 4 + count * SUBSTREAM_ENTRY.size
    if offset > len(payload):
        raise FormatError("payload is too short for its substream directory")
    _, rows, cols = header.latent_shape
    found = []
    for i in range(count):
        name, channels, height, width, reserved, length = SUBSTREAM_ENTRY.unpack_from(
            payload, 4 + i * SUBSTREAM_ENTRY.size)
        label = name.decode("ascii", "replace")
        if not name.isalpha() or not name.isascii():
            raise FormatError(f"substream {i} has an invalid name")
        if reserved:
            raise FormatError(f"substream {label} has a reserved field that is not zero")
        if not (1 <= channels and 1 <= height <= rows and 1 <= width <= cols):
            raise FormatError(f"substream {label} claims shape {channels}x{height}x{width}, which does not "
                              f"fit a latent grid of {rows}x{cols}")
        if length % 4 or offset + length > len(payload):
            raise FormatError(f"substream {label} claims {length} bytes, more than the payload holds")
        found.append(Substream(name, (channels, height, width), payload[offset:offset + length]))
        offset += length
    if offset != len(payload):
        raise FormatError(f"payload has {len(payload) - offset} bytes after its last substream")
    return found


def pack(header: Header, payload: bytes, sections: list[tuple[bytes, bytes]] | tuple = ()) -> bytes:
    """The whole file: header, payload, payload CRC, then the given (type, data) sections."""
    return b"".join(pack_parts(header, payload, sections))


def pack_parts(header: Header, payload, sections: list[tuple[bytes, bytes]] | tuple = ()) -> list:
    """:func:`pack` as a list of buffers to write in order, without joining them: the
    payload (any buffer, e.g. a numpy array of little-endian words, or a list of such
    buffers, as :func:`pack_substreams` gives) is not copied."""
    pieces = [memoryview(part).cast("B") for part in (payload if isinstance(payload, list) else [payload])]
    if header.payload_length != sum(piece.nbytes for piece in pieces):
        raise ValueError("header payload length does not match the payload")
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    parts = [header.pack(), *pieces, struct.pack("<I", crc)]
    for kind, body in sections:
        if len(kind) != 4 or not kind.isalpha() or not kind.isascii():
            raise ValueError(f"invalid section type {kind!r}")
        if len(body) > MAX_SECTION:
            raise ValueError(f"section {kind.decode()} is larger than {MAX_SECTION} bytes")
        parts += [SECTION_HEAD.pack(kind, len(body)), body, struct.pack("<I", zlib.crc32(kind + body))]
    return parts


def parse_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Validate and parse the fixed header (the first 38 bytes)."""
    if len(data) == 0:
        raise FormatError("empty input: not a .nic file")
    if data[:4] != MAGIC[: min(len(data), 4)]:
        raise FormatError("not a .nic file (bad magic bytes)")
    if len(data) < 5:
        raise FormatError("truncated file: the header ends at byte %d of %d" % (len(data), HEADER_SIZE))
    if data[4] not in VERSIONS:
        raise FormatError(f"unsupported .nic format version {data[4]} (this nic reads versions "
                          f"{', '.join(map(str, VERSIONS))})")
    if len(data) < HEADER_SIZE:
        raise FormatError("truncated file: the header ends at byte %d of %d" % (len(data), HEADER_SIZE))
    fixed = data[: HEADER.size]
    (stored_crc,) = struct.unpack_from("<I", data, HEADER.size)
    if zlib.crc32(fixed) != stored_crc:
        raise FormatError("header is corrupt (CRC mismatch)")
    (_, version, model_id, quality, colour, width, height, weights_hash,
     channels, rows, cols, payload_length) = HEADER.unpack(fixed)
    if colour not in COLOUR_NAMES:
        raise FormatError(f"unknown colour layout {colour}")
    if width < 1 or height < 1:
        raise FormatError(f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise FormatError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
                          f"{max_pixels} pixels (raise it with --max-pixels)")
    if rows != -(-height // 16) or cols != -(-width // 16) or channels < 1:
        raise FormatError(f"latent shape {channels}x{rows}x{cols} does not fit a {width}x{height} image")
    if payload_length % 4:
        raise FormatError("payload length is not a multiple of 4 bytes")
    if payload_length > 1024 + width * height * MAX_BITS_PER_PIXEL // 8:
        raise FormatError(f"payload length {payload_length} is implausible for {width}x{height} pixels")
    return Header(model_id, quality, colour, width, height, weights_hash, (channels, rows, cols),
                  payload_length, version)


def max_file_size(header: Header) -> int:
    """Most bytes a file with this (validated) header is read to: header, payload, its
    CRC and at most SECTIONS_LIMIT of sections. Readers stop there instead of at EOF."""
    return HEADER_SIZE + header.payload_length + 4 + SECTIONS_LIMIT


def unpack(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Container:
    """Parse a whole file; raises :class:`FormatError` naming the problem."""
    header = parse_header(data, max_pixels)
    end = HEADER_SIZE + header.payload_length
    if len(data) < end + 4:
        raise FormatError(f"truncated file: {len(data)} bytes, the header promises at least {end + 4}")
    payload = data[HEADER_SIZE:end]
    (stored_crc,) = struct.unpack_from("<I", data, end)
    if zlib.crc32(payload) != stored_crc:
        raise FormatError("payload is corrupt (CRC mismatch)")
    sections = []
    offset = end + 4
    while offset < len(data):
        if len(data) - offset < SECTION_HEAD.size + 4:
            raise FormatError(f"trailing garbage after the payload at byte {offset}")
        kind, length = SECTION_HEAD.unpack_from(data, offset)
        if length > MAX_SECTION:
            raise FormatError(f"section at byte {offset} claims {length} bytes, more than the {MAX_SECTION} allowed")
        body_end = offset + SECTION_HEAD.size + length
        if body_end + 4 > len(data):
            raise FormatError(f"truncated section at byte {offset}")
        body = data[offset + SECTION_HEAD.size : body_end]
        (crc,) = struct.unpack_from("<I", data, body_end)
        if zlib.crc32(kind + body) != crc:
            raise FormatError(f"section at byte {offset} is corrupt (CRC mismatch)")
        if not all(65 <= b <= 90 or 97 <= b <= 122 for b in kind):
            raise FormatError(f"invalid section type at byte {offset}")
        if kind[0] < 97 and kind not in CRITICAL_SECTIONS:
            raise FormatError(f"file needs section {kind.decode()}, which this nic does not know")
        if any(kind == seen for seen, _ in sections) and kind[0] < 97:
            raise FormatError(f"section {kind.decode()} appears twice")
        sections.append((kind, body))
        offset = body_end + 4
    return Container(header, payload, sections)


def profile_space(icc: bytes | None) -> bytes | None:
    """An ICC profile's data colour space (b"RGB ", b"GRAY", b"CMYK", b"Lab ", …: bytes
    16..20 of its header), None without one."""
    return bytes(icc[16:20]) if icc and len(icc) >= 128 else None


PROFILE_SPACES = {1: b"GRAY", 3: b"RGB "}
"""The ICC colour space that describes nic's pixels of 1 and 3 channels."""


def profile_for(icc: bytes | None, channels: int) -> bytes | None:
    """The profile a file of ``channels`` channels stores: ``icc`` where its colour space
    is theirs, else None. nic codes CMYK, Lab and other pixels as RGB (or L): their
    profile would tell a viewer to read that RGB as CMYK or Lab, so it is left out and
    the pixels are taken as sRGB."""
    return icc if profile_space(icc) == PROFILE_SPACES[channels] else None
