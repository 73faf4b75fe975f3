"""Determinism and golden bitstreams (issue #7, docs/robustness.md).

tests/golden/bitstreams.json holds the SHA-256 of the .nic bytes of a fixed generated
32x48 image at every quality (and one grayscale file), together with the hash of the
weights that made them and the SHA-256 of the image's pixels. The test fails when
anything differs: the bitstream of a given image, weights and nic version must never
drift silently (files already written must keep decoding to the same pixels, and an
encoder change that alters bytes should be a decision, not an accident).

When the change is intended (new weights, a deliberate encoder change), regenerate
and commit the file:

    NIC_REGENERATE_GOLDEN=1 python -m pytest -q tests/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import platform
import os
from pathlib import Path

import numpy as np
import pytest

from nic import api, container, factorized
from nic.weights import default_weights

GOLDEN = Path(__file__).parent / "golden" / "bitstreams.json"
REGENERATE = os.environ.get("NIC_REGENERATE_GOLDEN") == "1"
HOW_TO_REGENERATE = ("if the change is intended, run `NIC_REGENERATE_GOLDEN=1 python -m pytest -q "
                     "tests/test_golden.py` and commit tests/golden/bitstreams.json")
QUALITIES = range(1, 9)


def golden_image(height: int = 32, width: int = 48, channels: int = 3, seed: int = 20240607) -> np.ndarray:
    """A fixed photo-like image: integer arithmetic and numpy's PCG64 only, so that it is
    the same on every machine (its SHA-256 is recorded next to the bitstreams)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    yy, xx = np.mgrid[0:height, 0:width]
    planes = [(xx * (3 + c) + yy * (5 - c) + ((xx // 8 + yy // 8) % 2) * 60) % 256 for c in range(channels)]
    image = np.stack(planes, axis=-1).astype(np.int64)
    image = (image + rng.integers(-12, 13, size=image.shape)) // 2 + 64
    return np.clip(image, 0, 255).astype(np.uint8)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def threads():
    """Set the thread count of both engines (nic.engine's and torch's), restored afterwards."""
    import torch

    from nic import engine

    saved = torch.get_num_threads(), engine.threads()

    def set_threads(count: int) -> None:
        torch.set_num_threads(count)
        engine.set_threads(count)

    yield set_threads
    torch.set_num_threads(saved[0])
    engine.set_threads(saved[1])


def current() -> dict:
    _, digest = default_weights(family="factorized")
    rgb, gray = golden_image(), golden_image(channels=1)
    files = {f"q{q}": api.encode_pixels(rgb, q, family="factorized") for q in QUALITIES}
    files["gray-q4"] = api.encode_pixels(gray, 4, family="factorized")
    return {
        "about": "SHA-256 of nic bitstreams of tests/test_golden.py:golden_image(); " + HOW_TO_REGENERATE,
        "weights_hash": digest.hex(),
        "image_sha256": {"rgb-32x48": sha256(rgb.tobytes()), "gray-32x48": sha256(gray.tobytes())},
        "bitstreams": {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()},
    }


def test_golden_bitstreams(threads):
    threads(1)
    now = current()
    if REGENERATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(now, indent=1) + "\n")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; {HOW_TO_REGENERATE}"
    recorded = json.loads(GOLDEN.read_text())
    assert now["image_sha256"] == recorded["image_sha256"], (
        "the generated golden image changed (numpy's generator or golden_image()); " + HOW_TO_REGENERATE)
    assert now["weights_hash"] == recorded["weights_hash"], (
        f"the golden bitstreams were made with weights {recorded['weights_hash']}, the installed weights "
        f"are {now['weights_hash']}; {HOW_TO_REGENERATE}")
    changed = [name for name in recorded["bitstreams"]
               if now["bitstreams"].get(name) != recorded["bitstreams"][name]]
    assert not changed, (f"the bitstreams of {', '.join(changed)} changed with the same weights "
                         f"(an encoder change?); {HOW_TO_REGENERATE}")
    assert sorted(now["bitstreams"]) == sorted(recorded["bitstreams"])


def test_same_bytes_across_runs_and_thread_counts(threads):
    image = golden_image()
    streams = {}
    for count in (1, 2, 1):
        threads(count)
        streams.setdefault(count, []).append([api.encode_pixels(image, q) for q in QUALITIES])
    assert streams[1][0] == streams[1][1], "encoding twice in one process gave different bytes"
    assert streams[1][0] == streams[2][0], "the bitstream depends on torch's thread count"


def test_decoding_is_deterministic(threads):
    threads(1)
    data = api.encode_pixels(golden_image(), 5)
    first = api.decode_pixels(data).pixels
    assert np.array_equal(first, api.decode_pixels(data).pixels)
    threads(2)
    other = api.decode_pixels(data).pixels
    # Pixels are not part of the format's contract across thread counts (float summation
    # order may differ), but they may not drift by more than a rounding step.
    assert np.abs(first.astype(int) - other.astype(int)).max() <= 1


@pytest.mark.parametrize("channels", [3, 1])
def test_decoded_latents_equal_the_encoders(threads, channels):
    threads(1)
    model, _ = default_weights(family="factorized")
    image = golden_image(channels=channels)
    for quality in QUALITIES:
        data = api.encode_pixels(image, quality, family="factorized")
        decoded = api.decode_pixels(data)
        expected = factorized.quantize_latents(model, image, quality)
        assert decoded.latents.dtype == np.int64
        np.testing.assert_array_equal(decoded.latents, expected, err_msg=f"quality {quality}")
        header = container.unpack(data).header
        assert header.latent_shape == expected.shape
        assert decoded.pixels.shape == image.shape


def test_escapes_round_trip_exactly():
    """Latents far outside every table (escape + bypass codes) come back bit-exact."""
    model, _ = default_weights(family="factorized")
    coder = factorized.coder(model, 4)
    latents = np.zeros((model.config.M, 2, 3), dtype=np.int64)
    extremes = [0, 1, -1, 5000, -5000, 2**16, -(2**16) - 1, 2**31 - 1, -(2**31 - 1)]
    latents.flat[:len(extremes)] = extremes
    assert np.array_equal(coder.decode(coder.encode(latents), latents.shape), latents)


WITHOUT_AMX = "x86_64 without AMX"
"""Where the tiny models' golden files were made unless they say otherwise (a 2-core AMD
EPYC, AVX2 only; an EPYC with AVX-512 builds the same tiny models)."""


def cpu_kind() -> str:
    """The kind of CPU as far as float results go: the tiny models' tables, rounded from
    float densities, come out differently on a Xeon with AMX than on an AMD EPYC, with
    AVX-512 or without (measured on all three)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.machine()
    return f"{platform.machine()} with AMX" if "amx_tile" in flags else f"{platform.machine()} without AMX"


def check_golden(path, digests, made: bytes, digest: bytes, integers, threads) -> bytes:
    """The golden file at ``path`` (re-made from ``made`` with NIC_REGENERATE_GOLDEN=1):
    its weights hash is ``digest``, it decodes with 2 threads to the integers recorded in
    ``digests`` (``integers(data)``: a dict of SHA-256), and ``made`` (encoded with 1
    thread) is it byte for byte. Returns its bytes."""
    if REGENERATE:
        path.write_bytes(made)
        digests.write_text(json.dumps({"weights_hash": digest.hex(), "made_on": cpu_kind(), **integers(made)},
                                      indent=1) + "\n")
    data = path.read_bytes()
    recorded = json.loads(digests.read_text())
    if recorded["weights_hash"] != digest.hex() and recorded.get("made_on", WITHOUT_AMX) != cpu_kind():
        pytest.skip(f"the tiny model behind {path.name} builds to other weights on this kind of CPU "
                    f"({cpu_kind()}; the file was made on {recorded.get('made_on', WITHOUT_AMX)}): its tables are "
                    "rounded from float densities; the shipped weights' golden files check decoding across CPUs")
    assert recorded["weights_hash"] == digest.hex() == container.unpack(data).header.weights_hash.hex(), (
        f"the tiny model behind {path.name} (tests/conftest.py) changed (torch's initialization?); "
        + HOW_TO_REGENERATE)
    threads(2)
    assert {k: v for k, v in recorded.items() if k not in ("weights_hash", "made_on")} == integers(data)
    assert made == data, f"the bitstream of {path.name} changed; " + HOW_TO_REGENERATE
    return data


HYPERPRIOR_GOLDEN = GOLDEN.parent / "hyperprior-tiny-q3.nic"
HYPERPRIOR_DIGESTS = GOLDEN.parent / "hyperprior-tiny-q3.json"


def hyperprior_integers(model, data: bytes) -> dict:
    """SHA-256 of what a hyperprior file decodes to before g_s: ẑ, the integer h_s's means
    and scale indices, and the residuals. All integers (μ·256 too): the same everywhere."""
    from nic import hyperprior

    header = container.unpack(data).header
    z, y = container.unpack(data).substreams()
    z_coder, y_coder = hyperprior.coders(model, header.quality)
    z_hat = z_coder.decode(z.data, z.shape)
    mean, index = model.hyper_decode(z_hat, header.quality, *y.shape[1:])
    residual = y_coder.decode(y.data, index.ravel())
    return {name: sha256(np.ascontiguousarray(value).astype(np.int64).tobytes()) for name, value in
            (("z_hat", z_hat), ("mean_x256", mean * 256), ("index", index), ("residual", residual))}


def test_hyperprior_golden_file_decodes_to_the_same_integers(threads, tiny_hyperprior_weights):
    """A hyperprior file made once (a tiny random model, tests/conftest.py) decodes on any
    machine and thread count to exactly the integers it decoded to where it was made:
    the integer hyper-decoder and the range coders are exact. Its bytes are re-made too."""
    from nic.weights import load_weights

    threads(1)
    model, digest = load_weights(tiny_hyperprior_weights)
    made = api.encode_pixels(golden_image(), 3, tiny_hyperprior_weights)
    data = check_golden(HYPERPRIOR_GOLDEN, HYPERPRIOR_DIGESTS, made, digest, lambda d: hyperprior_integers(model, d),
                        threads)
    assert api.decode_pixels(data, tiny_hyperprior_weights).pixels.shape == golden_image().shape


CONTEXT_GOLDEN = GOLDEN.parent / "context-tiny-q3.nic"
CONTEXT_DIGESTS = GOLDEN.parent / "context-tiny-q3.json"


def context_integers(model, data: bytes) -> dict:
    """SHA-256 of ẑ and of the residuals a hyperprior file with context decodes to: the
    residuals come out right only if every pass's scale indices (from the integer h_s and
    the integer context networks, over the decoded ŷ) are the ones the encoder used."""
    from nic import hyperprior

    parsed = container.unpack(data)
    header, substreams = parsed.header, parsed.substreams()
    z_coder, _ = hyperprior.coders(model, header.quality)
    step = dict(parsed.sections).get(container.SECTION_STEP)
    step = hyperprior.UNIT_STEP if step is None else container.unpack_step(step)
    seen = []
    hyperprior.decompress(model, header.quality, header.height, header.width, False, substreams, lambda rows: None,
                          on_latents=lambda store: seen.append(store.rows(0, store.shape[1])), step=step)
    return {name: sha256(np.ascontiguousarray(value).astype(np.int64).tobytes()) for name, value in
            (("z_hat", z_coder.decode(substreams[0].data, substreams[0].shape)), ("residual", seen[0]))}


def test_context_golden_file_decodes_to_the_same_integers(threads, tiny_context_weights, monkeypatch):
    """A file of the tiny context model (tests/conftest.py) in several blocks (BLOCK made
    4 for a small image), made once, decodes on any thread count to the same integers,
    and is re-made byte for byte: the layout of blocks and passes is fixed."""
    from nic import hyperprior
    from nic.weights import load_weights

    monkeypatch.setattr(hyperprior, "BLOCK", 4)
    threads(1)
    model, digest = load_weights(tiny_context_weights, coding=True)
    image = golden_image(160, 96)
    made = api.encode_pixels(image, 3, tiny_context_weights)
    check_golden(CONTEXT_GOLDEN, CONTEXT_DIGESTS, made, digest, lambda d: context_integers(model, d), threads)


@pytest.mark.parametrize("quality", [1, 3, 4, 5, 6, 8, 3.5])
def test_shipped_hyperprior_files_decode_to_the_same_integers(threads, quality):
    """Files of the shipped hyperprior weights (the default family), made once, decode on
    any machine and thread count to the integers they decoded to where they were made,
    and are re-made byte for byte (3.5: a quality between two, with a STEP section)."""
    threads(1)
    model, digest = default_weights(family="hyperprior", coding=True)
    made = api.encode_pixels(golden_image(), quality, family="hyperprior")
    check_golden(GOLDEN.parent / f"hyperprior-shipped-q{quality}.nic",
                 GOLDEN.parent / f"hyperprior-shipped-q{quality}.json", made, digest,
                 lambda d: context_integers(model, d), threads)


def test_a_file_of_the_first_step_span_keeps_decoding(threads):
    """A -q 3.5 file as written before the shipped weights had a span per interval
    (Δ = 2**(0.625·0.5), nic.hyperprior.STEP_SPAN), kept as it was made and never re-made,
    decodes with 2 threads to the integers recorded where it was made: the decoder takes
    the step from the file's STEP section."""
    path = GOLDEN.parent / "hyperprior-span0.625-q3.5.nic"
    recorded = json.loads(path.with_suffix(".json").read_text())
    model, _ = default_weights(family="hyperprior", coding=True)
    threads(2)
    assert {k: v for k, v in recorded.items() if k not in ("weights_hash", "made_on")} == \
        context_integers(model, path.read_bytes())


def pixels_integers(data: bytes) -> dict:
    """SHA-256 of the indices and the pixels a pixels-family file decodes to."""
    decoded = api.decode_pixels(data)
    return {"indices": sha256(np.ascontiguousarray(decoded.latents).astype(np.int64).tobytes()),
            "pixels": sha256(decoded.pixels.tobytes())}


@pytest.mark.parametrize("quality", [3, 8])
def test_pixels_files_decode_to_the_same_pixels(threads, quality):
    """Files of the pixels family (no weights), made once, decode to the same indices and
    pixels, and are re-made byte for byte: its tables and its scan order are fixed."""
    from nic import pixels

    threads(1)
    made = api.encode_pixels(golden_image(40, 56), quality, family="pixels")
    check_golden(GOLDEN.parent / f"pixels-q{quality}.nic", GOLDEN.parent / f"pixels-q{quality}.json", made,
                 pixels.NO_WEIGHTS, pixels_integers, threads)


@pytest.mark.parametrize("quality", [3, 8])
def test_pixels_files_of_the_median_predictor_keep_decoding(threads, quality):
    """Files of the pixels family's first predictor (nic.pixels.MEDIAN, written until the
    GRADIENT predictor replaced it), kept as they were made and never re-made, decode to
    the same indices and pixels."""
    from nic import pixels

    path = GOLDEN.parent / f"pixels-median-q{quality}.nic"
    data = path.read_bytes()
    assert pixels.parameters_in(container.unpack(data).substreams())[1] == pixels.MEDIAN
    recorded = json.loads(path.with_suffix(".json").read_text())
    threads(2)
    assert {k: v for k, v in recorded.items() if k != "weights_hash"} == pixels_integers(data)


@pytest.mark.parametrize("name", ["pixels-dictionary-q8", "pixels-dictionary-step3", "pixels-dictionary-interleaved"])
def test_pixels_files_of_the_dictionary_codings_keep_decoding(threads, name):
    """Files of the pixels family's dictionary codings (nic.pixels.DICTIONARIES: LZMA2 of
    the quantized pixel values, plane by plane or interleaved; lossless, and at step 3),
    kept as they were made and never re-made (another liblzma may compress the same values
    to other bytes), decode to the same values and pixels."""
    from nic import pixels

    path = GOLDEN.parent / f"{name}.nic"
    data = path.read_bytes()
    recorded = json.loads(path.with_suffix(".json").read_text())
    assert pixels.parameters_in(container.unpack(data).substreams())[1] == recorded["coding"]
    threads(2)
    assert {k: v for k, v in recorded.items() if k not in ("weights_hash", "made_on", "coding")} == \
        pixels_integers(data)


def overlay_integers(model, data: bytes) -> dict:
    """SHA-256 of what a file with pixel tiles decodes to in integers: the tile map, the
    tiles' packed pixels and the model's residuals."""
    from nic import hyperprior, overlay

    parsed = container.unpack(data)
    header, substreams = parsed.header, parsed.substreams()
    tiles, packed = overlay.decode(substreams[:3], header.height, header.width, False)
    seen = []
    hyperprior.decompress(model, header.quality, header.height, header.width, False, substreams, lambda rows: None,
                          on_latents=lambda store: seen.append(store.rows(0, store.shape[1])))
    return {name: sha256(np.ascontiguousarray(value).astype(np.int64).tobytes()) for name, value in
            (("tiles", tiles), ("packed", packed), ("residual", seen[0]))}


def test_overlay_golden_file_decodes_to_the_same_integers(threads, tiny_hyperprior_weights):
    """A file with pixel tiles over the tiny model's (nic.overlay; two tiles, one cut by
    the image's edges), made once, decodes to the same integers and is re-made byte for
    byte: the tile map and the packing of the tiles are fixed."""
    from nic import overlay
    from nic.weights import load_weights

    threads(1)
    model, digest = load_weights(tiny_hyperprior_weights, coding=True)
    image = golden_image(160, 200)
    tiles = np.zeros(overlay.grid(160, 200), dtype=bool)
    tiles[0, 1] = tiles[2, 3] = True
    made = api._overlay_file(image, overlay.Choice(tiles, 4), model, digest, 3, None, 3)
    check_golden(GOLDEN.parent / "overlay-tiny-q3.nic", GOLDEN.parent / "overlay-tiny-q3.json", made, digest,
                 lambda d: overlay_integers(model, d), threads)


EARLIER = sorted(GOLDEN.parent.glob("hyperprior-earlier-*.nic"))
"""Golden files of hyperprior weights that later weights extend (nic.weights, ``extends``):
kept as they were made, never re-made."""


@pytest.mark.parametrize("path", EARLIER, ids=lambda path: path.stem)
def test_files_of_earlier_shipped_weights_keep_decoding(threads, path):
    """A file made with hyperprior weights that have since been extended still finds its
    weights among the installed ones (the earlier file stays installed beside the new
    one) and decodes, with 2 threads, to the integers recorded where it was made."""
    from nic.weights import weights_for

    data = path.read_bytes()
    recorded = json.loads(path.with_suffix(".json").read_text())
    header = container.unpack(data).header
    model, digest = weights_for(header.model_id, header.weights_hash, coding=True)
    assert digest.hex() == recorded["weights_hash"] != default_weights(family="hyperprior")[1].hex()
    threads(2)
    assert {k: v for k, v in recorded.items() if k not in ("weights_hash", "made_on")} == context_integers(model, data)
