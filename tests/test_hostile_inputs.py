"""Limits, safe files and hostile inputs (issue #7, docs/robustness.md).

Every hostile input either works as a user would expect, or fails with exit code 1
and exactly one stderr line starting with 'nic: error:' — no traceback, and no
output file left behind (nor an existing one clobbered).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nic import api, container
from nic.cli import cli
from nic.container import FormatError, Header
from nic.images import ImageError, read_image
from nic.weights import WeightsError, load_weights, read_arrays, weights_hash

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


# ---- helpers --------------------------------------------------------------------------------

def image(height: int = 24, width: int = 40, channels: int = 3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    planes = [(xx * (4 + c) + yy * (3 + 2 * c)) % 200 + 20 for c in range(channels)]
    pixels = np.stack(planes, axis=-1) + rng.integers(0, 8, (height, width, channels))
    return pixels.astype(np.uint8)


def encoded(im: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG built by hand: IHDR (valid CRC), an IDAT of ``rows`` if given, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + idat + png_chunk(b"IEND", b"")


def rgb16_png(pixels16: np.ndarray) -> bytes:
    height, width, _ = pixels16.shape
    rows = b"".join(b"\x00" + pixels16[y].astype(">u2").tobytes() for y in range(height))
    return raw_png(width, height, 16, 2, rows)


def run(*args: str, input: bytes | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def assert_clean_error(result, folder: Path | None = None, before: set[str] | None = None, match: str = ""):
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nic: error: "), result.stderr
    assert "Traceback" not in result.output
    assert match.lower() in lines[0].lower(), lines[0]
    if folder is not None:
        assert {p.name for p in folder.iterdir()} == before, "a failed command left a file behind"


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def nic_header(width: int, height: int, payload_length: int = 4, channels: int = 192) -> Header:
    return Header(model_id=1, quality=4, colour=container.COLOUR_RGB, width=width, height=height,
                  weights_hash=bytes(8), latent_shape=(channels, min(-(-height // 16), 0xFFFF),
                                                       min(-(-width // 16), 0xFFFF)),
                  payload_length=payload_length)


@pytest.fixture(scope="module")
def valid_nic() -> bytes:
    return api.encode_pixels(image(), 3)


# ---- 2. limits -----------------------------------------------------------------------------

@pytest.mark.parametrize("max_pixels", [container.DEFAULT_MAX_PIXELS, 4096 * 4096])
def test_header_claiming_100000x100000_fails_fast_before_allocating(max_pixels):
    data = nic_header(100_000, 100_000).pack() + bytes(8)
    import nic.coding  # noqa: F401  (decode_pixels imports it, and torch, first: not what is timed)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(FormatError, match=r"100000x100000 = 10000000000 pixels exceeds the limit of "
                                              rf"{max_pixels} pixels \(raise it with --max-pixels\)"):
            api.decode_pixels(data, max_pixels=max_pixels)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 0.5 and peak < 1 << 20, (seconds, peak)


def test_cli_decode_of_a_huge_header_is_one_line(tmp_path):
    src = tmp_path / "huge.nic"
    src.write_bytes(nic_header(100_000, 100_000).pack() + bytes(8))
    before = listing(tmp_path)
    assert_clean_error(run("decode", str(src), "-o", str(tmp_path / "out.png")), tmp_path, before,
                       "exceeds the limit of 178956970 pixels")
    assert_clean_error(run("info", str(src)), tmp_path, before, "exceeds the limit")


def test_decode_honours_max_pixels(tmp_path, valid_nic):
    src = tmp_path / "a.nic"
    src.write_bytes(valid_nic)
    before = listing(tmp_path)
    out = tmp_path / "a.png"
    assert_clean_error(run("decode", str(src), "-o", str(out), "--max-pixels", str(24 * 40 - 1)),
                       tmp_path, before, f"40x24 = 960 pixels exceeds the limit of {24 * 40 - 1} pixels")
    assert_clean_error(run("info", str(src), "--max-pixels", "959"), tmp_path, before, "exceeds the limit")
    result = run("decode", str(src), "-o", str(out), "--max-pixels", str(24 * 40))
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (40, 24)


def test_encode_honours_max_pixels(tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(encoded(Image.fromarray(image())))
    before = listing(tmp_path)
    out = tmp_path / "in.nic"
    assert_clean_error(run("encode", str(src), "-o", str(out), "--max-pixels", "959"), tmp_path, before,
                       "image of 40x24 exceeds the limit of 959 pixels")
    # Beyond twice the limit Pillow's own bomb check answers first: the same refusal, in one line.
    assert_clean_error(run("encode", "-", "-o", str(out), "--max-pixels", "100", input=src.read_bytes()), tmp_path,
                       before, "exceeds the limit of 100 pixels (raise it with --max-pixels)")
    assert run("encode", str(src), "-o", str(out), "--max-pixels", "960").exit_code == 0
    assert container.unpack(out.read_bytes()).header.width == 40


def test_payload_length_is_checked_against_the_bytes_present(valid_nic):
    parsed = container.unpack(valid_nic)
    h = parsed.header
    # Claims more than the file holds: refused without reading past the end.
    lying = Header(**{**h.__dict__, "payload_length": h.payload_length + 400}).pack() + parsed.payload
    with pytest.raises(FormatError, match=rf"truncated file: {len(lying)} bytes, the header promises at least "
                                          rf"{container.HEADER_SIZE + h.payload_length + 404}"):
        api.decode_pixels(lying)
    # Claims more than any honest payload of that size could be: refused from the header alone.
    absurd = Header(**{**h.__dict__, "payload_length": 1 << 30}).pack()
    with pytest.raises(FormatError, match="implausible"):
        container.parse_header(absurd)
    # Claims fewer bytes than follow: the rest is not a valid section.
    short = Header(**{**h.__dict__, "payload_length": h.payload_length - 4})
    data = short.pack() + parsed.payload + struct.pack("<I", zlib.crc32(parsed.payload))
    with pytest.raises(FormatError):
        api.decode_pixels(data)


def test_huge_png_header_fails_fast_before_allocating():
    bomb = raw_png(100_000, 100_000, 8, 2, None)
    Image.init()  # Pillow's plugin imports are not what is measured
    for limit in (None, container.DEFAULT_MAX_PIXELS, 4096 * 4096):
        tracemalloc.start()
        started = time.perf_counter()
        try:
            with pytest.raises(ImageError, match="too large|exceeds the limit"):
                read_image(bomb, max_pixels=limit)
            seconds, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert seconds < 0.5 and peak < 1 << 20, (limit, seconds, peak)
    with pytest.raises(ImageError, match="100000x100000 exceeds the limit of 6000000000 pixels"):
        read_image(bomb, max_pixels=6_000_000_000)  # between 1x and 2x: nic's own check answers


# ---- 4. safe files ---------------------------------------------------------------------------

class Exploit:
    """Unpickling this creates a marker file: proof that pickle code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_with_an_object_array_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = str(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, gain=np.ones(3, np.float32), evil=np.array([Exploit()], dtype=object))
    with pytest.raises(WeightsError, match="not a valid weights file"):
        load_weights(path)
    assert not marker.exists(), "loading weights ran pickle code"


def test_a_pickle_is_not_a_weights_file(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = str(marker)
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"gain": Exploit()}))
    with pytest.raises(WeightsError, match="not a valid weights file"):
        load_weights(path)
    # .npy with a pickled payload inside a zip: refused too.
    npy = io.BytesIO()
    np.save(npy, np.array([Exploit()], dtype=object), allow_pickle=True)
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("gain.npy", npy.getvalue())
    with pytest.raises(WeightsError):
        read_arrays(archive.getvalue())
    assert not marker.exists()


def test_file_made_with_other_weights_is_refused_naming_the_hash(tmp_path, tiny_weights):
    data = api.encode_pixels(image(), 2, weights=tiny_weights)
    needed = container.unpack(data).header.weights_hash.hex()
    assert needed == weights_hash(read_arrays(Path(tiny_weights).read_bytes())).hex()
    with pytest.raises(WeightsError, match=f"this file needs weights {needed}"):
        api.decode_pixels(data)
    src = tmp_path / "a.nic"
    src.write_bytes(data)
    before = listing(tmp_path)
    assert_clean_error(run("decode", str(src), "-o", str(tmp_path / "a.png")), tmp_path, before,
                       f"needs weights {needed}")
    shipped = api.encode_pixels(image(), 2)
    src.write_bytes(shipped)
    assert_clean_error(run("decode", str(src), "--weights", tiny_weights, "-o", str(tmp_path / "a.png")),
                       tmp_path, before, f"needs weights {container.unpack(shipped).header.weights_hash.hex()}")


def _zip(**members: bytes) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name + ".npy", data)
    return buffer.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_malformed_weights_files_are_weights_errors(tmp_path, monkeypatch):
    import nic.weights

    monkeypatch.setattr(nic.weights, "MAX_WEIGHTS_BYTES", 1 << 20)  # so that the zip bomb is cheap to make
    plain_npy = io.BytesIO()
    np.save(plain_npy, np.ones(3))
    cases = {
        "a plain .npy": plain_npy.getvalue(),
        "an array claiming 4 TiB": _zip(gain=_npy_header((1 << 40,)) + bytes(16)),
        "an array claiming 8 GiB, 16 bytes present": _zip(gain=_npy_header((1 << 31,)) + bytes(16)),
        "a zip bomb": _zip(gain=_npy_header((1 << 19,)) + bytes(1 << 21)),
        "an empty file": b"",
    }
    for name, data in cases.items():
        started = time.perf_counter()
        with pytest.raises(WeightsError, match="not a valid weights file"):
            read_arrays(data)
        assert time.perf_counter() - started < 5, name


@pytest.mark.parametrize("change", [{"N": "abc"}, {"N": -5}, {"M": 10**9}, {"lambdas": []}, {"lambdas": "x"}])
def test_weights_with_a_broken_config_are_weights_errors(tmp_path, tiny_weights, change):
    import json

    arrays = read_arrays(Path(tiny_weights).read_bytes())
    config = json.loads(bytes(arrays["config"]).decode())
    config.update(change)
    arrays["config"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    with pytest.raises(WeightsError, match="broken.npz"):
        load_weights(path)


def test_weights_must_be_a_bounded_regular_file(tmp_path, png_file):
    with pytest.raises(WeightsError, match="not a regular file"):
        load_weights(tmp_path)
    if Path("/dev/zero").exists():
        with pytest.raises(WeightsError, match="not a regular file"):
            load_weights("/dev/zero")
        before = listing(tmp_path)
        assert_clean_error(run("encode", str(png_file), "--weights", "/dev/zero", "-o", str(tmp_path / "x.nic")),
                           tmp_path, before, "not a regular file")


def test_saving_weights_is_atomic(tmp_path, monkeypatch, tiny_weights):
    from nic.weights import save_weights

    arrays = read_arrays(Path(tiny_weights).read_bytes())
    target = tmp_path / "w.npz"
    target.write_bytes(b"old weights")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError):
        save_weights(arrays, target)
    assert listing(tmp_path) == {"w.npz"} and target.read_bytes() == b"old weights"


@pytest.fixture
def png_file(tmp_path) -> Path:
    src = tmp_path / "in.png"
    src.write_bytes(encoded(Image.fromarray(image())))
    return src


def test_output_under_a_regular_file_is_a_clean_error(tmp_path, png_file):
    (tmp_path / "file.txt").write_text("not a folder")
    before = listing(tmp_path)
    assert_clean_error(run("encode", str(png_file), "-o", str(tmp_path / "file.txt" / "x.nic")), tmp_path, before)
    assert (tmp_path / "file.txt").read_text() == "not a folder"


@pytest.mark.skipif(ROOT, reason="root ignores directory permissions; covered by the path-under-a-file case")
def test_unwritable_directory_is_a_clean_error(tmp_path, png_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_clean_error(run("encode", str(png_file), "-o", str(locked / "x.nic")), match="permission denied")
        assert listing(locked) == set()
    finally:
        locked.chmod(0o700)


def test_permission_denied_is_a_clean_error_even_as_root(tmp_path, png_file, monkeypatch):
    """The test above cannot run as root (root ignores permissions): fake the refusal."""
    import nic.cli

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(nic.cli.tempfile, "mkstemp", refuse)
    before = listing(tmp_path)
    assert_clean_error(run("encode", str(png_file), "-o", str(tmp_path / "x.nic")), tmp_path, before,
                       "permission denied")


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_full_disk_is_a_clean_error_and_leaves_no_temp_file(tmp_path, png_file, monkeypatch, where):
    import nic.cli

    target = tmp_path / "in.nic"
    target.write_bytes(b"precious old output")
    before = listing(tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "fsync":
        monkeypatch.setattr(nic.cli.os, "fsync", no_space)
    else:
        real_fdopen = os.fdopen

        class Full(io.RawIOBase):
            def __init__(self, fd):
                self.f = real_fdopen(fd, "wb")

            def write(self, b):
                no_space()

            def close(self):
                self.f.close()
                super().close()

            def fileno(self):
                return self.f.fileno()

        monkeypatch.setattr(nic.cli.os, "fdopen", lambda fd, mode="r", *a, **k: Full(fd))
    result = run("encode", str(png_file), "-o", str(target))
    assert_clean_error(result, tmp_path, before, f"cannot write ({os.strerror(errno.ENOSPC)})")
    assert target.read_bytes() == b"precious old output"


def test_failed_encode_leaves_an_existing_output_alone(tmp_path):
    target = tmp_path / "x.nic"
    target.write_bytes(b"old")
    src = tmp_path / "bad.png"
    src.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert_clean_error(run("encode", str(src), "-o", str(target)), tmp_path, listing(tmp_path))
    assert target.read_bytes() == b"old"


# ---- 5. hostile inputs to `nic encode` -----------------------------------------------------

def _truncated_png() -> bytes:
    data = encoded(Image.fromarray(image(64, 64)))
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    data = encoded(Image.fromarray(image(64, 64)), "JPEG", quality=90)
    return data[: len(data) // 2]


def _palette(transparency: bool, used: bool = True) -> bytes:
    im = Image.fromarray(image()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if not transparency:
        return encoded(im)
    index = int(np.asarray(im)[0, 0]) if used else 255
    return encoded(im, transparency=index)


def _cmyk_jpeg() -> bytes:
    return encoded(Image.fromarray(image()).convert("CMYK"), "JPEG", quality=95)


def _exif_rotated_jpeg() -> bytes:
    im = Image.fromarray(image(24, 40))  # 40 wide, 24 high as stored
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown 24 wide, 40 high
    return encoded(im, "JPEG", quality=95, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((250, 10, 10), (10, 10, 250))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _gray16() -> bytes:
    values = (np.arange(24 * 40, dtype=np.uint16).reshape(24, 40) * 68).astype(np.uint16)
    return encoded(Image.fromarray(values))  # mode I;16


def _rgb16() -> bytes:
    return rgb16_png(image().astype(np.uint16) * 257)


def _gray_with_trns() -> bytes:
    return encoded(Image.fromarray(image(channels=1)[..., 0]), transparency=int(image(channels=1)[0, 0, 0]))


def _rgb_with_trns() -> bytes:
    px = image()
    return encoded(Image.fromarray(px), transparency=tuple(int(v) for v in px[0, 0]))


def _gray16_with_trns(used: bool = True) -> bytes:
    values = (np.arange(24 * 40, dtype=np.uint16).reshape(24, 40) * 68).astype(np.uint16)
    return encoded(Image.fromarray(values), transparency=int(values[3, 3]) if used else 1)


def _float_tiff_with_nan() -> bytes:
    values = np.linspace(0, 255, 24 * 40, dtype=np.float32).reshape(24, 40)
    values[0, :5] = [np.nan, np.inf, -np.inf, -3.0, 1e30]
    return encoded(Image.fromarray(values, "F"), "TIFF")


# name -> (bytes, expected): ("ok", (width, height, channels)) or ("error", message fragment)
CASES = {
    "truncated PNG": (_truncated_png, ("error", "cannot read image")),
    "truncated JPEG": (_truncated_jpeg, ("error", "cannot read image")),
    "PNG header claiming 100000x100000": (lambda: raw_png(100_000, 100_000, 8, 2, None),
                                          ("error", "exceeds the limit")),
    "zero-byte file": (lambda: b"", ("error", "input is empty")),
    "text file": (lambda: b"hello, I am not an image\n" * 20, ("error", "not an image")),
    "PNG signature and garbage": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)), ("error", "")),
    "16-bit grayscale PNG (I;16)": (_gray16, ("ok", (40, 24, 1))),
    "16-bit RGB PNG": (_rgb16, ("ok", (40, 24, 3))),
    "palette PNG": (lambda: _palette(False), ("ok", (40, 24, 3))),
    "palette PNG, transparent index used": (lambda: _palette(True), ("error", "transparency")),
    "palette PNG, transparent index unused": (lambda: _palette(True, used=False), ("ok", (40, 24, 3))),
    "grayscale PNG with tRNS": (_gray_with_trns, ("error", "transparency")),
    "RGB PNG with tRNS": (_rgb_with_trns, ("error", "transparency")),
    "16-bit grayscale PNG with tRNS": (_gray16_with_trns, ("error", "transparency")),
    "16-bit grayscale PNG with unused tRNS": (lambda: _gray16_with_trns(False), ("ok", (40, 24, 1))),
    "LA PNG, opaque": (lambda: encoded(Image.fromarray(image(channels=1)[..., 0]).convert("LA")),
                       ("ok", (40, 24, 1))),
    "CMYK JPEG": (_cmyk_jpeg, ("ok", (40, 24, 3))),
    "JPEG with EXIF orientation 6": (_exif_rotated_jpeg, ("ok", (24, 40, 3))),
    "animated GIF (first frame)": (_animated_gif, ("ok", (32, 24, 3), "input has 2 frames")),
    "1x1 PNG": (lambda: encoded(Image.new("RGB", (1, 1), (200, 30, 90))), ("ok", (1, 1, 3))),
    "1x1 grayscale PNG": (lambda: encoded(Image.new("L", (1, 1), 77)), ("ok", (1, 1, 1))),
    "1-bit PNG": (lambda: encoded(Image.fromarray(image(channels=1)[..., 0]).convert("1")), ("ok", (40, 24, 1))),
    "float TIFF with NaN and inf": (_float_tiff_with_nan, ("ok", (40, 24, 1))),
    # Pillow would run Ghostscript on EPS: refused before any parsing.
    "EPS (Ghostscript)": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
                          ("error", "not an image")),
    "corrupt .nic as input": (lambda: api.encode_pixels(image(), 2)[:-9], ("error", "")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_to_encode(tmp_path, name):
    make, (kind, expected, *warned) = CASES[name]
    src = tmp_path / "input.bin"
    src.write_bytes(make())
    out = tmp_path / "out.nic"
    before = listing(tmp_path)
    result = run("encode", str(src), "-o", str(out), "-q", "2")
    if kind == "error":
        assert_clean_error(result, tmp_path, before, expected)
        return
    assert result.exit_code == 0, result.output
    if warned:  # what is left out of an input is said, in one line naming it
        assert result.stderr.startswith(f"nic: warning: {src}: {warned[0]}") and result.stderr.count("\n") == 1
    else:
        assert result.stderr == ""
    width, height, channels = expected
    decoded = api.decode_pixels(out.read_bytes())
    assert (decoded.header.width, decoded.header.height) == (width, height)
    assert decoded.pixels.shape == (height, width, channels)


def test_hostile_input_on_stdin(tmp_path):
    before = listing(tmp_path)
    assert_clean_error(run("encode", "-", "-o", str(tmp_path / "x.nic"), input=_truncated_jpeg()),
                       tmp_path, before, "-: cannot read image")


def test_directory_and_missing_file_as_input(tmp_path):
    folder = tmp_path / "photos.png"
    folder.mkdir()
    before = listing(tmp_path)
    assert_clean_error(run("encode", str(folder), "-o", str(tmp_path / "x.nic")), tmp_path, before,
                       "is a directory")
    assert_clean_error(run("encode", str(tmp_path / "nope.png"), "-o", str(tmp_path / "x.nic")), tmp_path,
                       before, "no such file")
    assert_clean_error(run("decode", str(folder), "-o", str(tmp_path / "x.png")), tmp_path, before,
                       "is a directory")


def test_transparency_flattens_with_background(tmp_path):
    src = tmp_path / "p.png"
    src.write_bytes(_palette(True))
    result = run("encode", str(src), "-o", str(tmp_path / "p.nic"), "--background", "white")
    assert result.exit_code == 0, result.output
    for make in (_gray_with_trns, _gray16_with_trns):
        src.write_bytes(make())
        assert run("encode", str(src), "-o", str(tmp_path / "g.nic"), "--background", "white").exit_code == 0
        assert api.decode_pixels((tmp_path / "g.nic").read_bytes()).pixels.shape[2] == 1
    src.write_bytes(_rgb_with_trns())
    assert run("encode", str(src), "-o", str(tmp_path / "c.nic"), "--background", "#808080").exit_code == 0
    assert api.decode_pixels((tmp_path / "c.nic").read_bytes()).pixels.shape[2] == 3


def test_exif_rotation_is_applied_to_the_pixels(tmp_path):
    src = tmp_path / "r.jpg"
    src.write_bytes(_exif_rotated_jpeg())
    pixels = read_image(src.read_bytes())
    upright = np.asarray(Image.open(io.BytesIO(_exif_rotated_jpeg())).convert("RGB"))
    # Orientation 6 displays the stored image rotated 90° clockwise.
    assert pixels.shape == (40, 24, 3)
    assert np.abs(pixels.astype(int) - np.rot90(upright, k=-1).astype(int)).max() == 0


def test_animated_gif_encodes_its_first_frame():
    from nic.images import FramesWarning

    with pytest.warns(FramesWarning, match="input has 2 frames"):
        pixels = read_image(_animated_gif())
    assert pixels.shape == (24, 32, 3)
    red, _, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200 and blue < 50


def test_sixteen_bit_input_is_scaled_not_clipped():
    gray = read_image(_gray16())
    assert gray.shape == (24, 40, 1) and gray.max() > 200 and gray.min() == 0
    rgb = read_image(_rgb16())
    np.testing.assert_array_equal(rgb, image())  # v*257 >> 8 == v


def test_hostile_input_in_a_real_process(tmp_path):
    src = tmp_path / "cut.png"
    src.write_bytes(_truncated_png())
    huge = tmp_path / "huge.png"
    huge.write_bytes(raw_png(100_000, 100_000, 8, 2, None))
    env = {k: v for k, v in os.environ.items() if k != "NIC_DEBUG"}
    before = listing(tmp_path)
    for path, fragment in ((src, "cannot read image"), (huge, "exceeds the limit")):
        result = subprocess.run([sys.executable, "-m", "nic", "encode", str(path), "-o", str(tmp_path / "o.nic")],
                                capture_output=True, env=env, timeout=120)
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert stderr.count("\n") == 1 and stderr.startswith("nic: error: ") and fragment in stderr, stderr
        assert result.stdout == b""
        assert listing(tmp_path) == before


@pytest.mark.skipif(not Path("/dev/zero").exists() or sys.platform != "linux", reason="needs /dev/zero")
def test_endless_input_is_refused_not_read_into_memory(tmp_path):
    """`nic info /dev/zero` must stop at a bound, not read until memory runs out.
    (Run under a 1.5 GiB address-space limit so that the current behaviour cannot hurt the machine.)"""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))

    result = subprocess.run([sys.executable, "-m", "nic", "info", "/dev/zero"], capture_output=True,
                            preexec_fn=limit, timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and stderr.startswith("nic: error: ") and "internal" not in stderr, stderr
