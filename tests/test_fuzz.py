"""Property-based fuzzing of the .nic decoder (issue #7, docs/robustness.md).

Invariant: ``nic.api.decode_pixels(data)`` on any bytes either returns pixels that
match the header, or raises ``FormatError`` / ``WeightsError``. Never another
exception, never a hang, never an allocation beyond the pixel limit.

Seeds are valid files made here (a generated 24x40 image at every quality, a
grayscale one, one with an ancillary section) with the installed weights, so the
corpus follows the weights. Mutations: bit flips, byte overwrites with
"interesting" integers, truncations, insertions, deletions, splices between
seeds, appended garbage and sections; then, for half of the raw mutants, the
CRCs are recomputed (:func:`fix_crcs`) so that the mutant reaches header
validation and the range decoder instead of stopping at a CRC check. A third
family edits header fields and the payload structurally and re-packs them with
valid CRCs and (usually) a matching payload length.

CI size: about 60 s in all on two busy cores. A long run:

    NIC_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py
    python tools/fuzz_decode.py --seconds 600      # plain random loop, prints counts

NIC_FUZZ_EXAMPLES is the example count of the main decode_pixels fuzz; the cheap
targets scale with it. NIC_FUZZ_REPORT=FILE writes the outcome counts as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import os
import struct
import time
import tracemalloc
import zlib
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from nic import api, container, factorized, pixels
from nic.coding import LATENT_LIMIT, CorruptStream
from nic.container import HEADER, HEADER_SIZE, SECTION_HEAD, FormatError, Header
from nic.weights import WeightsError, default_weights

FUZZ_MAX_PIXELS = 512 * 512
"""Pixel limit passed to the decoder under fuzz. Decoding time is linear in the pixel
count a header claims, and a 42-byte file can honestly claim a large flat image (a
symbol costs as little as 2e-5 bits), so the limit is what bounds the work. 512x512
keeps every example under about a second; the limit logic itself is tested with
100000x100000 and 4096x4096 headers in tests/test_hostile_inputs.py."""

ALLOCATION_BOUND = 64 << 20
"""Peak traced (Python + numpy) allocation allowed per decode under FUZZ_MAX_PIXELS."""

EXAMPLES = int(os.environ.get("NIC_FUZZ_EXAMPLES", "0")) or None

HANG_SECONDS = 600 * max(1.0, (EXAMPLES or 0) / 800)
"""A fuzz test running this long is hung (each takes seconds, under a minute on a slow
machine, at the CI's 800 examples or fewer; scaled with NIC_FUZZ_EXAMPLES): faulthandler
dumps every thread and exits (``watchdog``)."""

INTERESTING = (0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 127, 128, 191, 192, 193, 255, 256,
               0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)

OUTCOMES: Counter = Counter()


def examples(ci: int, scale: float = 1.0) -> int:
    return max(1, int(EXAMPLES * scale)) if EXAMPLES else ci


def fuzz_settings(ci: int, scale: float = 1.0, deadline_ms: int = 10_000):
    """Hypothesis settings: derandomized (CI is reproducible) unless NIC_FUZZ_SEED picks
    another seed (what tools/fuzz_decode.py does to explore beyond the CI examples)."""
    chosen = os.environ.get("NIC_FUZZ_SEED")
    config = settings(max_examples=examples(ci, scale), deadline=deadline_ms, derandomize=chosen is None,
                      database=None, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.function_scoped_fixture])

    def decorate(test):
        test = config(test)
        return seed(int(chosen))(test) if chosen is not None else test

    return decorate


# ---- seeds ---------------------------------------------------------------------------

def seed_image(height: int = 24, width: int = 40, channels: int = 3, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [128 + 90 * np.sin(xx / width * 4 + c) * np.cos(yy / height * 3 - c) for c in range(channels)]
    image = np.stack(planes, axis=-1) + rng.normal(0, 6, (height, width, channels))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def section(kind: bytes, body: bytes) -> bytes:
    return SECTION_HEAD.pack(kind, len(body)) + body + struct.pack("<I", zlib.crc32(kind + body))


@lru_cache(maxsize=1)
def seeds() -> tuple[bytes, ...]:
    """Valid files: qualities 1..8 (RGB 24x40), a grayscale 17x9 at 3, quality 5 plus
    sections, and the pixels family's at qualities 3 and 8 and in gray, and in its
    dictionary coding (RGB lossless, gray at step 3)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rgb = seed_image()
        files = [api.encode_pixels(rgb, q, family="factorized") for q in range(1, 9)]
        files.append(api.encode_pixels(seed_image(17, 9, 1, seed=3), 3, family="factorized"))
        files.append(files[4] + section(b"xTRA", b"ancillary data a reader skips")
                     + section(b"iCCP", b"not really an ICC profile"))
        files += [api.encode_pixels(rgb, q, family="pixels") for q in (3, 8)]
        files.append(api.encode_pixels(seed_image(17, 9, 1, seed=3), 5, family="pixels"))
        for image, step in ((rgb, 1), (seed_image(17, 9, 1, seed=3), 3)):  # the dictionary coding (LZMA2)
            found = pixels.dictionary_trial(image, step)
            files.append(b"".join(api._file_parts(pixels.MODEL, pixels.NO_WEIGHTS, 8, image.shape[2], image.shape[1],
                                                  image.shape[0], pixels.encode_trial(found, *image.shape[:2]),
                                                  None, None, False)))
    finally:
        torch.set_num_threads(threads)
    return tuple(files)


# ---- CRC repair and re-packing -----------------------------------------------------------

def fix_crcs(data: bytes) -> bytes:
    """Recompute every CRC that the layout of nic.container puts in ``data``: the header's
    (bytes 34..37), the payload's (at 38 + the payload length field, if present) and
    each well-formed section's. Everything else is left as it is."""
    b = bytearray(data)
    if len(b) < HEADER_SIZE:
        return bytes(b)
    b[HEADER.size:HEADER_SIZE] = struct.pack("<I", zlib.crc32(b[:HEADER.size]))
    (length,) = struct.unpack_from("<I", b, HEADER.size - 4)
    end = HEADER_SIZE + length
    if end + 4 > len(b):
        return bytes(b)
    b[end:end + 4] = struct.pack("<I", zlib.crc32(b[HEADER_SIZE:end]))
    offset = end + 4
    while offset + SECTION_HEAD.size + 4 <= len(b):
        kind, n = SECTION_HEAD.unpack_from(b, offset)
        body_end = offset + SECTION_HEAD.size + n
        if body_end + 4 > len(b):
            break
        b[body_end:body_end + 4] = struct.pack("<I", zlib.crc32(bytes(kind) + b[offset + SECTION_HEAD.size:body_end]))
        offset = body_end + 4
    return bytes(b)


def repack(header: Header, payload: bytes, sections: bytes = b"", payload_length: int | None = None) -> bytes:
    """A file with valid CRCs from (possibly invalid) header fields and any payload.
    ``payload_length`` overrides the length field (default: the real length)."""
    if payload_length is not None:
        header = dataclasses.replace(header, payload_length=payload_length)
    else:
        header = dataclasses.replace(header, payload_length=len(payload))
    return header.pack() + payload + struct.pack("<I", zlib.crc32(payload)) + sections


# ---- mutations ----------------------------------------------------------------------------

def apply_op(data: bytearray, op: tuple, pool: tuple[bytes, ...]) -> bytearray:
    kind = op[0]
    n = len(data)
    if kind == "flip" and n:
        data[op[1] % n] ^= 1 << op[2]
    elif kind == "set" and n:
        at = op[1] % n
        data[at:at + len(op[2])] = op[2]
        del data[n:]
    elif kind == "int" and n:
        at = op[1] % n
        width, value = op[2], op[3] & ((1 << (8 * op[2])) - 1)
        data[at:at + width] = value.to_bytes(width, "little")
        del data[n:]
    elif kind == "truncate":
        del data[op[1] % (n + 1):]
    elif kind == "insert":
        at = op[1] % (n + 1)
        data[at:at] = op[2]
    elif kind == "delete" and n:
        at = op[1] % n
        del data[at:at + op[2]]
    elif kind == "splice":
        other = pool[op[1] % len(pool)]
        data = data[:op[2] % (n + 1)] + bytearray(other[op[3] % (len(other) + 1):])
    elif kind == "append":
        data += op[1]
    elif kind == "section":
        data += section(op[1], op[2])
    return data


positions = st.integers(0, 1 << 16)
small_bytes = st.binary(min_size=1, max_size=12)
section_types = st.sampled_from([b"xTRA", b"ICCP", b"iCCP", b"eXIf", b"EXIF", b"abcd", b"A1b2",
                                 b"\x00\x00\x00\x00", b"zzzz"])

ops = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("set"), positions, small_bytes),
    st.tuples(st.just("int"), positions, st.sampled_from([1, 2, 4]),
              st.one_of(st.sampled_from(INTERESTING), st.integers(0, 0xFFFFFFFF))),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("insert"), positions, st.binary(max_size=16)),
    st.tuples(st.just("delete"), positions, st.integers(1, 16)),
    st.tuples(st.just("splice"), st.integers(0, 63), positions, positions),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("section"), section_types, st.binary(max_size=16)),
)


@st.composite
def raw_mutants(draw, fix: bool | None = None) -> bytes:
    pool = seeds()
    data = bytearray(pool[draw(st.integers(0, len(pool) - 1))])
    for op in draw(st.lists(ops, min_size=1, max_size=4)):
        data = apply_op(data, op, pool)
    if fix is None:
        fix = draw(st.booleans())
    return fix_crcs(bytes(data)) if fix else bytes(data)


dimension = st.one_of(st.integers(1, 96), st.sampled_from([0, 1, 15, 16, 17, 511, 512, 513, 4096, 65535,
                                                         100_000, 1 << 20, 0xFFFFFFFF]))


def rarely(draw, n: int) -> bool:
    """True about once in n draws. (Hypothesis favours small integers, so `== 0` would
    fire far more often than 1/n; the middle value is drawn about evenly.)"""
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def header_mutants(draw) -> bytes:
    """Valid CRCs, edited header fields and payload: reaches validation and the range decoder."""
    pool = seeds()
    parsed = container.unpack(pool[draw(st.integers(0, len(pool) - 1))])
    h = parsed.header
    changes = {}
    if rarely(draw, 10):
        changes["version"] = draw(st.sampled_from([0, 2, 255]))
    if rarely(draw, 6):
        changes["model_id"] = draw(st.sampled_from([0, 2, 255]))
    if rarely(draw, 4):
        changes["quality"] = draw(st.integers(0, 255))
    if rarely(draw, 6):
        changes["colour"] = draw(st.sampled_from([0, 1, 2, 3, 255]))
    if rarely(draw, 7):
        changes["weights_hash"] = draw(st.binary(min_size=8, max_size=8))
    width, height = h.width, h.height
    if rarely(draw, 3):
        width, height = draw(dimension), draw(dimension)
        changes.update(width=width, height=height)
    channels, rows, cols = h.latent_shape
    if not rarely(draw, 6):  # mostly keep the latent grid consistent with the dimensions
        rows, cols = min(-(-height // 16), 0xFFFF), min(-(-width // 16), 0xFFFF)
    else:
        rows, cols = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    if rarely(draw, 6):
        channels = draw(st.sampled_from([0, 1, 16, 191, 193, 0xFFFF]))
    changes["latent_shape"] = (channels, rows, cols)
    payload = bytearray(parsed.payload)
    how = draw(st.sampled_from(["keep", "flip", "words", "truncate", "extend", "random", "empty", "escapes"]))
    if how == "flip" and payload:
        for at in draw(st.lists(st.integers(0, len(payload) * 8 - 1), min_size=1, max_size=8)):
            payload[at // 8] ^= 1 << (at % 8)
    elif how == "words" and payload:
        for at, value in draw(st.lists(st.tuples(positions, st.sampled_from(INTERESTING)), min_size=1, max_size=4)):
            word = at % (len(payload) // 4 or 1)
            payload[4 * word:4 * word + 4] = value.to_bytes(4, "little")[:len(payload) - 4 * word]
    elif how == "truncate":
        del payload[4 * draw(st.integers(0, len(payload) // 4)):]
    elif how == "extend":
        extra = draw(st.binary(min_size=1, max_size=64))
        payload += extra if rarely(draw, 4) else extra[:len(extra) // 4 * 4]
    elif how == "random":
        payload = bytearray(draw(st.binary(min_size=0, max_size=256)))
    elif how == "empty":
        payload = bytearray()
    elif how == "escapes":  # words that decode to many escape symbols and long bypass codes
        payload = bytearray(b"\xff\xff\xff\xff" * draw(st.integers(1, 64)))
    length = None
    if rarely(draw, 5):
        length = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, len(payload) + 16)))
    sections = b""
    if rarely(draw, 5):
        sections = b"".join(section(draw(section_types), draw(st.binary(max_size=8)))
                            for _ in range(draw(st.integers(1, 3))))
    header = dataclasses.replace(h, **changes)
    return repack(header, bytes(payload), sections, length)


# ---- the invariant ------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report():
    """One torch thread (20x faster than 2 on a busy 2-core machine; the bytes do not
    depend on it) and one engine thread: the decoder then allocates on this thread only
    while check_decode starts and stops tracemalloc (see ``watchdog``). Also the
    optional JSON report."""
    import torch

    from nic import engine

    threads, engine_threads = torch.get_num_threads(), engine.threads()
    torch.set_num_threads(1)
    engine.set_threads(1)
    seeds()
    started = time.perf_counter()
    yield
    torch.set_num_threads(threads)
    engine.set_threads(engine_threads)
    report = os.environ.get("NIC_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1),
                                            "inputs": sum(OUTCOMES.values()),
                                            "outcomes": dict(sorted(OUTCOMES.items()))}, indent=1))


@contextlib.contextmanager
def watchdog():
    """faulthandler's hang watchdog, armed once for a whole test, not per example: the
    thread it starts frees memory as it starts, outside the GIL, and on CPython before
    3.12.9/3.13.2 that crashes when check_decode starts or stops tracemalloc at that
    moment (python/cpython#128679). Armed per example, it crashed the suite with a
    segmentation fault twice in ~12 runs here and once in CI (docs/robustness.md). The
    short sleep lets the thread start before the first example."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    time.sleep(0.05)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def hang_watchdog():
    with watchdog():
        yield


def check_decode(data: bytes, target: str, weights: str | None = None) -> str:
    """Run the decoder on ``data`` under the invariant; returns the outcome's name."""
    tracemalloc.start()
    try:
        decoded = api.decode_pixels(data, weights, max_pixels=FUZZ_MAX_PIXELS)
    except FormatError as exc:
        outcome = "FormatError: " + classify(str(exc))
    except WeightsError:
        outcome = "WeightsError"
    else:
        h = decoded.header
        assert h.width * h.height <= FUZZ_MAX_PIXELS
        assert decoded.pixels.dtype == np.uint8
        assert decoded.pixels.shape == (h.height, h.width, 1 if h.colour == container.COLOUR_GRAY else 3)
        if h.model_id == pixels.MODEL_ID:  # its "latents" are the indices of every pixel
            assert decoded.latents.shape in ((1, h.height, h.width), (3, h.height, h.width))
        else:
            assert decoded.latents.shape == h.latent_shape
        assert np.abs(decoded.latents).max() <= LATENT_LIMIT + 1
        outcome = "decoded"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= ALLOCATION_BOUND, f"decode allocated {peak} bytes"
    OUTCOMES[f"{target}: {outcome}"] += 1
    return outcome


def classify(message: str) -> str:
    """A short, stable bucket name for a FormatError message (for the outcome counts)."""
    for key in ("substream", "magic", "version", "truncated", "header is corrupt", "payload is corrupt (CRC",
                "range decoder", "latent channels", "colour", "dimensions", "exceeds the limit", "latent shape",
                "multiple of 4", "implausible", "section", "trailing", "quality"):
        if key in message:
            return key
    return message[:40]


# ---- the fuzz targets ---------------------------------------------------------------------

def test_seeds_decode():
    for data in seeds():
        assert check_decode(data, "seeds") == "decoded"


def test_fix_crcs_reaches_past_the_crc_checks():
    data = bytearray(seeds()[3])
    data[HEADER_SIZE + 2] ^= 0x10  # payload bit flip
    with pytest.raises(FormatError, match="CRC"):
        container.unpack(bytes(data))
    assert container.unpack(fix_crcs(bytes(data))).payload == bytes(data[HEADER_SIZE:-4])
    data[6] = 9  # quality 9 with a good header CRC
    assert "quality" in check_decode(fix_crcs(bytes(data)), "seeds")


@fuzz_settings(ci=3000, scale=2)
@given(raw_mutants())
def test_fuzz_container_unpack(data):
    """The parser alone (cheap): unpack raises FormatError or returns a consistent Container."""
    try:
        parsed = container.unpack(data, FUZZ_MAX_PIXELS)
    except FormatError as exc:
        OUTCOMES["unpack: FormatError: " + classify(str(exc))] += 1
    else:
        assert len(parsed.payload) == parsed.header.payload_length
        assert all(kind[0] >= 97 for kind, _ in parsed.sections)
        OUTCOMES["unpack: ok"] += 1


@fuzz_settings(ci=600, scale=0.5)
@given(quality=st.integers(1, 8), words=st.one_of(
    st.binary(max_size=512).map(lambda b: b[:len(b) // 4 * 4]),
    st.lists(st.sampled_from(INTERESTING), max_size=64).map(lambda v: b"".join(x.to_bytes(4, "little") for x in v))),
    rows=st.integers(1, 8), cols=st.integers(1, 8))
def test_fuzz_range_decoder(quality, words, rows, cols):
    """The range decoder alone: any payload words decode to int64 latents or raise CorruptStream."""
    model, _ = default_weights(family="factorized")
    coder = factorized.coder(model, quality)
    shape = (model.config.M, rows, cols)
    try:
        latents = coder.decode(words, shape)
    except CorruptStream:
        OUTCOMES["range decoder: CorruptStream"] += 1
    else:
        assert latents.shape == shape and latents.dtype == np.int64
        assert np.abs(latents).max() <= LATENT_LIMIT + 1
        OUTCOMES["range decoder: ok"] += 1


@fuzz_settings(ci=800)
@given(raw_mutants(fix=False))
def test_fuzz_decode_raw_mutations(data):
    check_decode(data, "raw")


@fuzz_settings(ci=800)
@given(raw_mutants(fix=True))
def test_fuzz_decode_raw_mutations_with_valid_crcs(data):
    check_decode(data, "raw+crc")


@fuzz_settings(ci=800)
@given(header_mutants())
def test_fuzz_decode_header_and_payload_edits(data):
    check_decode(data, "fields")


@lru_cache(maxsize=1)
def hyperprior_seeds(weights: str) -> tuple[bytes, ...]:
    """Files of the hyperprior family (container version 2) from a tiny random model."""
    return (api.encode_pixels(seed_image(), 3, weights), api.encode_pixels(seed_image(17, 9, 1, seed=3), 1, weights))


@st.composite
def substream_mutants(draw, weights: str) -> bytes:
    """A hyperprior file whose substream directory or substreams are edited, re-packed
    with valid CRCs: lying shapes, names, lengths and counts, and mutated stream bytes."""
    pool = hyperprior_seeds(weights)
    parsed = container.unpack(pool[draw(st.integers(0, len(pool) - 1))])
    streams = parsed.substreams()
    edited = []
    for stream in streams:
        name, shape, data = stream.name, list(stream.shape), bytearray(stream.data)
        if rarely(draw, 4):
            shape[draw(st.integers(0, 2))] = draw(st.sampled_from([0, 1, 2, 3, 7, 16, 0xFFFF]))
        if rarely(draw, 8):
            name = draw(st.sampled_from([b"zhat", b"yhat", b"xxxx", b"ZHAT"]))
        how = draw(st.sampled_from(["keep", "flip", "truncate", "extend", "random"]))
        if how == "flip" and data:
            for at in draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=6)):
                data[at // 8] ^= 1 << (at % 8)
        elif how == "truncate":
            del data[4 * draw(st.integers(0, len(data) // 4)):]
        elif how == "extend":
            data += draw(st.binary(min_size=4, max_size=64))[:4] * draw(st.integers(1, 8))
        elif how == "random":
            data = bytearray(draw(st.binary(max_size=128)))[: len(data) // 4 * 4 or 4]
        edited.append(container.Substream(name, tuple(shape), bytes(data[: len(data) // 4 * 4])))
    if rarely(draw, 6):
        edited = edited[::-1] if draw(st.booleans()) else edited[:1] * draw(st.integers(1, 3))
    payload = b"".join(bytes(p) for p in container.pack_substreams(edited))
    return repack(dataclasses.replace(parsed.header, payload_length=len(payload)), payload)


def test_fuzz_decode_hyperprior_substreams(tiny_hyperprior_weights):
    """The hyperprior family's decoder (substream directory, two range decoders, the
    integer h_s) under the same invariant, with a tiny random model's weights."""
    for data in hyperprior_seeds(tiny_hyperprior_weights):
        assert check_decode(data, "hyperprior seeds", tiny_hyperprior_weights) == "decoded"

    @fuzz_settings(ci=300)
    @given(substream_mutants(tiny_hyperprior_weights))
    def run(data):
        check_decode(data, "hyperprior", tiny_hyperprior_weights)

    run()


@fuzz_settings(ci=60, scale=0.02)
@given(st.one_of(raw_mutants(), header_mutants()))
def test_fuzz_cli_decode(tmp_path_factory, data):
    """`nic decode` on mutants: exit 0 with an image, or exit 1 with one 'nic: error:' line
    and no output file; never a traceback."""
    from click.testing import CliRunner

    from nic.cli import cli

    folder = tmp_path_factory.mktemp("cli")
    src, out = folder / "in.nic", folder / "out.png"
    src.write_bytes(data)
    result = CliRunner().invoke(cli, ["decode", str(src), "-o", str(out), "-j", "1",
                                      "--max-pixels", str(FUZZ_MAX_PIXELS)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if result.exit_code == 0:
        assert out.is_file()
        OUTCOMES["cli: exit 0"] += 1
    else:
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nic: error: "), result.stderr
        assert "Traceback" not in result.output
        assert sorted(p.name for p in folder.iterdir()) == ["in.nic"]
        OUTCOMES["cli: exit 1"] += 1
