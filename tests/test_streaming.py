"""nic.streaming: row readers give exactly what the whole-image Pillow path gives,
refuse (None) what they cannot reproduce, raise ImageError for broken files; row
writers make files Pillow reads back identically. Tiny generated images only."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import smooth_image
from nic import streaming
from nic.images import ORIENTATION, ImageError, image_metadata, pixels_from_image
from nic.streaming import STREAMED_FORMATS, RowReader, open_rows, row_writer

MODES = {"L": (0, 1), "RGB": (2, 3), "LA": (4, 2), "RGBA": (6, 4)}
TRANSPARENT = ("input has transparency, which nic does not store; flatten it onto a "
               "colour with --background (e.g. --background white; in Python, background=\"white\")")


# ----------------------------------------------------------------- PNG helpers


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return streaming.PNG_SIGNATURE + b"".join(chunk(kind, body) for kind, body in chunks)


def parse_png(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def ihdr(width: int, height: int, colour: int, depth: int = 8, interlace: int = 0) -> tuple[bytes, bytes]:
    return b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(kind: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """The PNG spec's filters, one pixel at a time (independent of nic.streaming)."""
    out = bytearray([kind])
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        out.append((x - (0, a, b, (a + b) // 2, paeth(a, b, c))[kind]) & 255)
    return bytes(out)


def hand_png(pixels: np.ndarray, filters, idat_sizes: int | None = None, extra_before=(), extra_after=(),
             raw_tail: bytes = b"") -> bytes:
    """A PNG of (h, w, c) pixels with the given filter type per row (cycled)."""
    h, w, c = pixels.shape
    colour = {1: 0, 3: 2, 2: 4, 4: 6}[c]
    prev = bytes(w * c)
    raw = bytearray()
    for y in range(h):
        row = pixels[y].tobytes()
        raw += filter_row(filters[y % len(filters)], row, prev, c)
        prev = row
    stream = zlib.compress(bytes(raw) + raw_tail, 9)
    size = idat_sizes or len(stream)
    idats = [(b"IDAT", stream[i:i + size]) for i in range(0, len(stream), size)]
    return build_png([ihdr(w, h, colour), *extra_before, *idats, *extra_after, (b"IEND", b"")])


def pillow_png(pixels: np.ndarray, **options) -> bytes:
    mode = {1: "L", 3: "RGB", 2: "LA", 4: "RGBA"}[pixels.shape[2]]
    im = Image.frombytes(mode, (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    buffer = io.BytesIO()
    im.save(buffer, "PNG", **options)
    return buffer.getvalue()


def noise(h: int, w: int, c: int, seed: int = 0, opaque: bool = True) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    if opaque and c in (2, 4):
        pixels[..., -1] = 255
    return pixels


def read_all(reader: RowReader, count: int) -> np.ndarray:
    parts = []
    while True:
        rows = reader.read(count)
        assert rows.dtype == np.uint8 and rows.shape[1:] == (reader.width, reader.channels)
        if not len(rows):
            break
        parts.append(rows)
    assert sum(len(p) for p in parts) == reader.height
    return np.concatenate(parts)


def stream_pixels(data: bytes, background: str | None = None, count: int = 7) -> np.ndarray:
    reader = open_rows(io.BytesIO(data), background)
    assert reader is not None
    with reader:
        return read_all(reader, count)


def whole_pixels(data: bytes, background: str | None = None) -> np.ndarray:
    return pixels_from_image(Image.open(io.BytesIO(data)), background)


# ----------------------------------------------------------------- reading PNG


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (17, 33)])
def test_pillow_png_rows_match_whole_image(mode, size):
    data = pillow_png(noise(*size, MODES[mode][1], seed=size[0] * 100 + size[1]))
    expected = whole_pixels(data)
    for count in (1, 7, size[0]):
        assert np.array_equal(stream_pixels(data, count=count), expected)


@pytest.mark.parametrize("mode", MODES)
def test_every_filter_type(mode, monkeypatch):
    monkeypatch.setattr(streaming, "STRIP_BYTES", 40)  # several strips per read: the row carried over
    pixels = noise(11, 13, MODES[mode][1], seed=3)
    for filters in ([0], [1], [2], [3], [4], [4, 3, 2, 1, 0]):
        data = hand_png(pixels, filters)
        assert np.array_equal(whole_pixels(data), pixels_from_image(
            Image.frombytes(mode, (13, 11), pixels.tobytes())))
        for count in (1, 4, 11):
            assert np.array_equal(stream_pixels(data, count=count), whole_pixels(data))


def test_smooth_image_and_many_idat_chunks(monkeypatch):
    monkeypatch.setattr(streaming, "READ_BLOCK", 5)  # IDAT chunks read in pieces
    pixels = smooth_image(40, 30)
    data = hand_png(pixels, [0, 1, 2, 3, 4], idat_sizes=17)
    with_empty = build_png([(k, b) for kind_body in parse_png(data) for (k, b) in
                            ([kind_body, (b"IDAT", b"")] if kind_body[0] == b"IDAT" else [kind_body])])
    for png in (data, with_empty, pillow_png(pixels)):
        assert np.array_equal(stream_pixels(png), pixels)


@pytest.mark.parametrize("background", ["white", "#336699"])
def test_transparent_rgba_flattened_like_whole_image(background, monkeypatch):
    monkeypatch.setattr(streaming, "STRIP_BYTES", 100)
    pixels = noise(17, 9, 4, seed=5, opaque=False)
    pixels[:8, :, 3] = 255  # opaque strips and transparent ones
    data = pillow_png(pixels)
    expected = whole_pixels(data, background)
    assert np.array_equal(stream_pixels(data, background, count=3), expected)
    assert stream_pixels(data, background).shape[2] == 3


@pytest.mark.parametrize("background", [None, "white", "#808080", "no-such-colour"])
def test_la_and_rgba_opaque_or_gray_background(background):
    for channels in (2, 4):
        data = pillow_png(noise(6, 7, channels, seed=channels))
        assert np.array_equal(stream_pixels(data, background), whole_pixels(data, background))
    transparent = pillow_png(noise(6, 7, 2, seed=9, opaque=False))
    if background in ("white", "#808080"):
        assert np.array_equal(stream_pixels(transparent, background), whole_pixels(transparent, background))


def test_transparency_without_background_refused():
    for channels in (2, 4):
        pixels = noise(9, 5, channels, seed=1)
        pixels[7, 2, -1] = 10
        data = pillow_png(pixels)
        with pytest.raises(ImageError) as whole:
            whole_pixels(data)
        reader = open_rows(io.BytesIO(data))
        assert reader is not None
        assert len(reader.read(7)) == 7  # strips before the transparent pixel are fine
        with pytest.raises(ImageError) as streamed:
            reader.read(7)
        assert str(streamed.value) == str(whole.value) == TRANSPARENT
        with pytest.raises(ImageError, match="transparency"):  # and it stays broken
            reader.read(7)
        with pytest.raises(ImageError, match="unknown background colour"):
            read_all(open_rows(io.BytesIO(data), "no-such-colour"), 9)


def test_la_with_coloured_background_left_to_pillow():
    data = pillow_png(noise(4, 4, 2, opaque=False))
    assert open_rows(io.BytesIO(data), "#336699") is None
    assert open_rows(io.BytesIO(data), "#333333") is not None


def metadata_exif(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "nic camera"  # Make
    exif.get_ifd(0x8769)[0x9003] = "2024:01:02 03:04:05"  # DateTimeOriginal, in the EXIF sub-IFD
    if orientation is not None:
        exif[ORIENTATION] = orientation
    return exif.tobytes()


def test_metadata_matches_pillow():
    pixels = noise(5, 6, 3)
    icc = bytes(range(256)) * 3
    for orientation in (None, 1):
        data = pillow_png(pixels, icc_profile=icc, exif=metadata_exif(orientation))
        reader = open_rows(io.BytesIO(data))
        assert reader is not None
        assert (reader.icc_profile, reader.exif) == image_metadata(Image.open(io.BytesIO(data)))
        assert reader.icc_profile == icc and reader.exif is not None
    # Orientation as the only tag: nothing left to keep.
    data = pillow_png(pixels, exif=_only_orientation())
    reader = open_rows(io.BytesIO(data))
    assert reader is not None and reader.exif is None and reader.icc_profile is None
    assert image_metadata(Image.open(io.BytesIO(data)))[1] is None


def _only_orientation() -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = 1
    return exif.tobytes()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_as_pillow_reads_it():
    chunks = parse_png(pillow_png(noise(2, 3, 3)))
    for body in (b"MM\0*garbage", b"", b"Exif\0\0II*\0\x08\0\0\0\xff\xff"):
        data = build_png(chunks[:1] + [(b"eXIf", body)] + chunks[1:])
        reader = open_rows(io.BytesIO(data))
        if reader is not None:
            assert (reader.icc_profile, reader.exif) == image_metadata(Image.open(io.BytesIO(data)))
            assert np.array_equal(read_all(reader, 2), whole_pixels(data))


def test_exif_after_idat_is_seen():
    pixels = noise(5, 6, 3)
    for orientation, eligible in ((1, True), (6, False)):
        chunks = parse_png(pillow_png(pixels, exif=metadata_exif(orientation)))
        exif = [c for c in chunks if c[0] == b"eXIf"]
        rest = [c for c in chunks if c[0] not in (b"eXIf", b"IEND")]
        data = build_png(rest + exif + [(b"IEND", b"")])
        reader = open_rows(io.BytesIO(data))
        assert (reader is not None) == eligible
        if eligible:
            assert reader.exif == image_metadata(Image.open(io.BytesIO(data)))[1]


def eligibility_cases() -> dict[str, bytes]:
    rgb = noise(6, 5, 3)
    cases = {}
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buffer, "PNG")
    cases["palette"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buffer, "PNG")
    cases["16-bit"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rgb[..., 0] > 128).save(buffer, "PNG")
    cases["1-bit"] = buffer.getvalue()
    chunks = parse_png(pillow_png(rgb))
    cases["interlaced"] = build_png([ihdr(5, 6, 2, interlace=1)] + chunks[1:])
    cases["tRNS"] = pillow_png(rgb[..., :1], transparency=3)
    cases["rotated eXIf"] = pillow_png(rgb, exif=metadata_exif(6))
    cases["exif text"] = build_png(chunks[:1] + [(b"tEXt", b"Raw profile type exif\0x")] + chunks[1:])
    cases["XMP"] = build_png(chunks[:-1] + [(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x/>")] + chunks[-1:])
    cases["unknown critical chunk"] = build_png(chunks[:1] + [(b"ABCD", b"")] + chunks[1:])
    cases["split IDAT runs"] = build_png(chunks[:-1] + [(b"tEXt", b"a\0b"), (b"IDAT", b"")] + chunks[-1:])
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG", save_all=True, append_images=[Image.fromarray(rgb[::-1])])
    cases["APNG"] = buffer.getvalue()
    for fmt in ("JPEG", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, fmt)
        cases[fmt] = buffer.getvalue()
    cases["PPM maxval 65535"] = b"P6 5 6 65535\n" + bytes(5 * 6 * 6)
    cases["PPM maxval 15"] = b"P5 5 6 15\n" + bytes(30)
    cases["plain PPM"] = b"P3 1 1 255\n1 2 3\n"
    cases["PBM"] = b"P4 8 1\n\0"
    cases["PNM token +5"] = b"P5 +5 6 255\n" + bytes(30)
    cases["empty"] = b""
    cases["short"] = b"\x89PN"
    return cases


@pytest.mark.parametrize("name", list(eligibility_cases()))
def test_left_to_pillow(name):
    stream = io.BytesIO(b"junk" + eligibility_cases()[name])
    stream.seek(4)
    assert open_rows(stream) is None
    assert stream.tell() == 4


def test_starts_at_stream_position_and_not_seekable():
    data = pillow_png(noise(3, 4, 3))
    stream = io.BytesIO(b"0123" + data)
    stream.seek(4)
    reader = open_rows(stream)
    assert reader is not None and np.array_equal(read_all(reader, 2), whole_pixels(data))

    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    assert open_rows(Pipe(data)) is None


def test_open_reads_no_image_data():
    class Counting(io.BytesIO):
        consumed = 0

        def read(self, size=-1):
            data = super().read(size)
            self.consumed += len(data)
            return data

    data = pillow_png(noise(100, 100, 3), exif=metadata_exif(1))
    stream = Counting(data)
    reader = open_rows(stream)
    assert reader is not None and len(data) > 30_000 and stream.consumed < 1000
    assert np.array_equal(read_all(reader, 40), whole_pixels(data))


def test_icc_profile_bounded(monkeypatch):
    monkeypatch.setattr(streaming, "MAX_SECTION", 1000)
    pixels = noise(2, 2, 3)
    assert open_rows(io.BytesIO(pillow_png(pixels, icc_profile=bytes(1000)))).icc_profile == bytes(1000)
    with pytest.raises(ImageError, match="ICC profile is larger"):
        open_rows(io.BytesIO(pillow_png(pixels, icc_profile=bytes(1001))))
    # A zlib error in the profile drops it, as Pillow does.
    chunks = parse_png(pillow_png(pixels))
    data = build_png(chunks[:1] + [(b"iCCP", b"ICC Profile\0\0not zlib")] + chunks[1:])
    assert open_rows(io.BytesIO(data)).icc_profile is None is image_metadata(Image.open(io.BytesIO(data)))[0]


# ----------------------------------------------------------------- broken PNG


def read_png(data: bytes) -> None:
    reader = open_rows(io.BytesIO(data))
    assert reader is not None
    read_all(reader, 3)


def outcomes(data: bytes) -> tuple[object, object]:
    """(streamed, whole): what each path makes of PNG bytes: pixels, "error", or, for
    the streamed path, "pillow" when it leaves the file to the whole-image path."""
    from nic.images import read_image

    try:
        reader = open_rows(io.BytesIO(data))
        streamed = "pillow" if reader is None else read_all(reader, 3)
    except ImageError:
        streamed = "error"
    try:
        whole = read_image(data)
    except ImageError:
        whole = "error"
    return streamed, whole


def assert_same_as_pillow(data: bytes) -> str:
    """The streamed path gives what the whole-image path gives (or defers to it):
    so `nic encode file.png` and `nic encode - < file.png` never differ."""
    streamed, whole = outcomes(data)
    if isinstance(streamed, str):
        assert streamed == "pillow" or isinstance(whole, str), f"streamed path: {streamed}, Pillow read it"
        return streamed
    assert isinstance(whole, np.ndarray) and np.array_equal(streamed, whole)
    return "pixels"


def test_truncated_png_at_every_offset():
    data = pillow_png(noise(7, 5, 3, seed=2), icc_profile=b"p" * 40, exif=metadata_exif(1))
    seen = set()
    for end in range(8, len(data)):
        seen.add(assert_same_as_pillow(data[:end]))
    assert seen == {"error", "pillow"}  # before the image data: refused; after it: Pillow decides
    with pytest.raises(ImageError, match="truncated in eXIf"):
        read_png(data[:data.index(b"eXIf") + 10])


def test_flipped_bytes():
    """Flipped bits before the image data are refused (CRCs); in and after it, the
    result is Pillow's, whatever it is."""
    data = pillow_png(noise(7, 5, 3, seed=4))
    idat = data.index(b"IDAT")
    for pos in range(8, 33):  # IHDR
        broken = bytearray(data)
        broken[pos] ^= 0x10
        with pytest.raises(ImageError):
            read_png(bytes(broken))
    for pos in range(idat - 4, len(data)):  # IDAT length, type, body, CRC, IEND
        broken = bytearray(data)
        broken[pos] ^= 0x10
        assert_same_as_pillow(bytes(broken))


def test_flipped_bytes_with_valid_crc_never_crash():
    """Corrupt zlib data behind a correct CRC: an ImageError or correct rows, never another error."""
    pixels = noise(6, 5, 4)
    chunks = parse_png(pillow_png(pixels))
    stream = [body for kind, body in chunks if kind == b"IDAT"][0]
    for pos in range(len(stream)):
        broken = bytearray(stream)
        broken[pos] ^= 0x41
        data = build_png([chunks[0], (b"IDAT", bytes(broken)), (b"IEND", b"")])
        try:
            rows = stream_pixels(data, "white", count=2)
        except ImageError:
            continue
        assert np.array_equal(rows, whole_pixels(data, "white"))


def test_lenient_where_pillow_is():
    """Files Pillow reads that a stricter reader would refuse: the same pixels here."""
    pixels = noise(4, 3, 3)
    good = hand_png(pixels, [1])
    chunks = parse_png(good)
    bad_crc = bytearray(good)
    bad_crc[good.index(b"IEND") - 1] ^= 1  # the IDAT's CRC
    cases = {
        "IDAT CRC": bytes(bad_crc),
        "bytes after the rows": hand_png(pixels, [1], raw_tail=b"\0"),
        "bytes after the zlib stream": build_png([chunks[0], (b"IDAT", chunks[1][1] + b"x"), chunks[2]]),
        "no adler32": build_png([chunks[0], (b"IDAT", chunks[1][1][:-4]), chunks[2]]),
        "no IEND": good[:good.index(b"IEND") - 4],
        "IEND with a body": good[:-12] + chunk(b"IEND", b"x" * 1000),
        "IEND CRC": good[:-1] + bytes([good[-1] ^ 1]),
    }
    for name, data in cases.items():
        assert assert_same_as_pillow(data) in ("pixels", "pillow"), name
        assert np.array_equal(whole_pixels(data), pixels), name


def test_iccp_as_pillow_reads_it():
    pixels = noise(3, 4, 3)
    chunks = parse_png(pillow_png(pixels))
    profile = zlib.compress(b"q" * 50)
    for body in (b"\0\0" + profile, b"no separator", b"name\0\x05" + profile):
        data = build_png(chunks[:1] + [(b"iCCP", body)] + chunks[1:])
        assert_same_as_pillow(data)
        reader = open_rows(io.BytesIO(data))
        if body.startswith(b"\0"):  # an empty name: Pillow takes the profile
            assert reader.icc_profile == b"q" * 50 == image_metadata(Image.open(io.BytesIO(data)))[0]
        else:  # malformed: Pillow's own reading of it decides
            assert reader is None


def test_wrong_amount_of_image_data():
    pixels = noise(4, 3, 3)
    chunks = parse_png(hand_png(pixels, [1]))
    short = zlib.compress(zlib.decompress(chunks[1][1])[:-1])
    data = build_png([chunks[0], (b"IDAT", short), chunks[2]])
    with pytest.raises(ImageError, match="too short"):
        read_png(data)
    assert_same_as_pillow(data)
    with pytest.raises(ImageError, match="no IDAT"):
        open_rows(io.BytesIO(build_png([chunks[0], chunks[2]])))


def test_unknown_filter_type():
    raw = b"\x05" + bytes(6)
    data = build_png([ihdr(2, 1, 2), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])
    with pytest.raises(ImageError, match="filter type 5"):
        read_png(data)


def test_bad_headers():
    for header in (ihdr(0, 5, 2), ihdr(5, 2**31, 2)):
        with pytest.raises(ImageError, match="PNG header is invalid"):
            open_rows(io.BytesIO(build_png([header, (b"IEND", b"")])))
    with pytest.raises(ImageError, match="IHDR"):
        open_rows(io.BytesIO(build_png([(b"tEXt", b"a\0b"), ihdr(1, 1, 0), (b"IEND", b"")])))
    with pytest.raises(ImageError, match="invalid chunk type"):
        open_rows(io.BytesIO(build_png([ihdr(1, 1, 0), (b"ID@T", b""), (b"IEND", b"")])))


def test_max_pixels_checked_before_pixel_data():
    # IHDR claims 10^10 pixels and the file ends right after it: the limit speaks first.
    data = build_png([ihdr(100_000, 100_000, 2)])
    message = "image of 100000x100000 exceeds the limit of 1000 pixels (raise it with --max-pixels)"
    with pytest.raises(ImageError) as refused:
        open_rows(io.BytesIO(data), max_pixels=1000)
    assert str(refused.value) == message
    with pytest.raises(ImageError, match="exceeds the limit of 29 pixels"):
        open_rows(io.BytesIO(pillow_png(noise(6, 5, 3))), max_pixels=29)
    assert open_rows(io.BytesIO(pillow_png(noise(6, 5, 3))), max_pixels=30) is not None
    with pytest.raises(ImageError, match="image of 70000x70000 exceeds"):
        open_rows(io.BytesIO(b"P6 70000 70000 255\n"), max_pixels=1000)
    # No limit given: Pillow's decompression-bomb limit, as on the whole-image path.
    bomb = 2 * Image.MAX_IMAGE_PIXELS + 1
    with pytest.raises(ImageError, match="decompression bomb"):
        open_rows(io.BytesIO(build_png([ihdr(bomb, 1, 2)])))


# ----------------------------------------------------------------- reading PGM/PPM


@pytest.mark.parametrize("header", [b"P6\n5 6\n255\n", b"P6 # comment\n5\t6 #c\r255 ", b"P6\n# a\n#b\n05 006\n255\n"])
def test_ppm_rows_match_pillow(header):
    pixels = noise(6, 5, 3, seed=7)
    data = header + pixels.tobytes() + b"trailing"
    for count in (1, 4, 6):
        assert np.array_equal(stream_pixels(data, count=count), whole_pixels(data))
    gray = b"P5 5 6 255\n" + pixels[..., :1].tobytes()
    assert np.array_equal(stream_pixels(gray), whole_pixels(gray))
    assert stream_pixels(gray).shape == (6, 5, 1)


def test_truncated_ppm():
    data = b"P6 5 6 255\n" + bytes(89)
    with pytest.raises(ImageError, match="PPM is truncated"):
        open_rows(io.BytesIO(data))
    with pytest.raises(ImageError, match="PGM header is invalid"):
        open_rows(io.BytesIO(b"P5 0 6 255\n"))


# ----------------------------------------------------------------- writing


def write(fmt: str, pixels: np.ndarray, step: int, **metadata) -> bytes:
    buffer = io.BytesIO()
    writer = row_writer(fmt, buffer, pixels.shape[1], pixels.shape[0], pixels.shape[2], **metadata)
    assert writer is not None
    for top in range(0, len(pixels), step):
        writer.write(pixels[top:top + step])
    writer.close()
    return buffer.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
def test_png_writer_round_trip(channels, monkeypatch):
    monkeypatch.setattr(streaming, "FILTER_BYTES", 200)  # several filter strips per write
    monkeypatch.setattr(streaming, "IDAT_SIZE", 100)  # several IDAT chunks
    for pixels in (smooth_image(23, 19, channels), noise(23, 19, channels), noise(1, 1, channels)):
        for step in (1, 5, 23):
            data = write("PNG", pixels, step)
            assert np.array_equal(whole_pixels(data), pixels)
            assert np.array_equal(stream_pixels(data), pixels)
            kinds = [kind for kind, _ in parse_png(data)]
            assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
            assert all(len(body) <= 100 for kind, body in parse_png(data) if kind == b"IDAT")


@pytest.fixture(params=["zlib", "zlib_ng"])
def deflater(request, monkeypatch):
    """The PNG writer with each deflater: zlib-ng where installed, else the standard zlib."""
    module = zlib if request.param == "zlib" else pytest.importorskip("zlib_ng.zlib_ng")
    monkeypatch.setattr(streaming, "_deflater", lambda: module)
    return module


def test_png_writer_deflates_with_zlib_ng_where_installed():
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        zlib_ng = zlib
    assert streaming._deflater() is zlib_ng


def test_png_writer_deflates_in_pieces_with_the_same_bytes_for_any_thread_count(monkeypatch, deflater):
    """Pieces deflated side by side (each primed with the bytes before it) make one valid
    zlib stream, and the file does not depend on the thread count."""
    from nic import engine

    monkeypatch.setattr(streaming, "DEFLATE_PIECE", 700)  # many pieces, most primed with a dictionary
    pixels = smooth_image(61, 47)
    files = []
    saved = engine.threads()
    try:
        for count in (1, 3):
            engine.set_threads(count)
            files.append(write("PNG", pixels, 7))
    finally:
        engine.set_threads(saved)
    assert files[0] == files[1]
    assert np.array_equal(whole_pixels(files[0]), pixels)
    raw = zlib.decompress(b"".join(body for kind, body in parse_png(files[0]) if kind == b"IDAT"))
    assert len(raw) == 61 * (47 * 3 + 1)


def test_png_writer_uses_all_filters_and_is_as_small_as_pillow(deflater):
    pixels = smooth_image(64, 80)
    data = write("PNG", pixels, 64)
    raw = zlib.decompress(b"".join(body for kind, body in parse_png(data) if kind == b"IDAT"))
    assert len(set(raw[:: 80 * 3 + 1])) >= 3
    assert len(data) <= 1.03 * len(pillow_png(pixels))


def test_png_writer_metadata():
    icc = bytes(range(256)) * 5
    exif = metadata_exif()
    data = write("PNG", smooth_image(5, 4), 5, icc_profile=icc, exif=exif)
    im = Image.open(io.BytesIO(data))
    assert im.info["icc_profile"] == icc
    assert dict(im.getexif()) == dict(Image.open(io.BytesIO(pillow_png(noise(1, 1, 3), exif=exif))).getexif())
    assert im.getexif()[0x010F] == "nic camera"
    assert image_metadata(im) == (icc, exif)
    reader = open_rows(io.BytesIO(data))
    assert (reader.icc_profile, reader.exif) == (icc, exif)


@pytest.mark.parametrize("channels", [1, 3])
def test_ppm_writer_round_trip(channels):
    pixels = noise(7, 9, channels)
    data = write("PPM", pixels, 3, icc_profile=b"ignored")
    assert data.startswith(b"P5\n9 7\n255\n" if channels == 1 else b"P6\n9 7\n255\n")
    assert np.array_equal(whole_pixels(data), pixels)
    assert np.array_equal(stream_pixels(data), pixels)


def test_writer_misuse():
    assert row_writer("JPEG", io.BytesIO(), 2, 2, 3) is None
    assert STREAMED_FORMATS == {"PNG", "PPM"}
    for fmt in ("PNG", "PPM"):
        writer = row_writer(fmt, io.BytesIO(), 4, 3, 3)
        writer.write(np.zeros((2, 4, 3), np.uint8))
        with pytest.raises(ValueError, match="rows written"):
            writer.write(np.zeros((2, 4, 3), np.uint8))
        for bad in (np.zeros((1, 4, 1), np.uint8), np.zeros((1, 4, 3), np.int16), np.zeros((4, 3), np.uint8)):
            with pytest.raises(ValueError, match="rows must be"):
                writer.write(bad)
        with pytest.raises(ValueError, match="only 2 of 3 rows"):
            writer.close()
        writer.write(np.zeros((1, 4, 3), np.uint8))
        writer.close()
        with pytest.raises(ValueError):
            row_writer(fmt, io.BytesIO(), 0, 3, 3)
        with pytest.raises(ValueError):
            row_writer(fmt, io.BytesIO(), 4, 3, 2)


def test_reader_misuse():
    reader = open_rows(io.BytesIO(pillow_png(noise(3, 2, 3))))
    with pytest.raises(ValueError):
        reader.read(-1)
    assert reader.read(0).shape == (0, 2, 3)
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read(1)
