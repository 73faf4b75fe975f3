"""The pixels family (nic.pixels): lossless and near-lossless coding of the pixels
themselves, and the default encoder's choice between it and the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import smooth_image
from nic import api, container, hardset, pixels
from nic.container import FormatError, Substream


def drawing(height: int = 96, width: int = 128) -> np.ndarray:
    """Black lines and boxes on white: what the model cannot reproduce."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for n in range(0, width, 9):
        draw.line([(n, 0), (width - n, height - 1)], fill=(0, 0, 0))
    draw.rectangle([10, 10, 40, 30], outline=(200, 0, 0))
    return np.asarray(image).copy()


def noise(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _round_trip(image: np.ndarray, step: int) -> tuple[np.ndarray, list[Substream]]:
    substreams = pixels.compress(pixels.MODEL, image, 4, step=step)
    rows: list[np.ndarray] = []
    pixels.decompress(pixels.MODEL, 4, image.shape[0], image.shape[1], image.shape[2] == 1, substreams, rows.append)
    return np.concatenate(rows), substreams


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 1), (9, 1, 3), (2, 2, 1), (17, 23, 3), (40, 33, 1),
                                   (2, 270_000, 1)])  # a row wider than a band: in parts
def test_step_one_is_lossless_at_any_size(shape):
    image = noise(*shape)
    decoded, _ = _round_trip(image, 1)
    assert np.array_equal(decoded, image)


@pytest.mark.parametrize("step", [2, 5, 16, 255])
def test_every_pixel_comes_back_within_half_a_step(step):
    for image in (smooth_image(37, 41), noise(20, 30, 3), drawing()[..., :1]):
        decoded, _ = _round_trip(image, step)
        assert np.abs(decoded.astype(int) - image).max() <= step // 2


def _scanned_file(image: np.ndarray, step: int, quality: int = 6) -> bytes:
    """A pixels file of the scan's coding (not the dictionary's, whichever is smaller)."""
    substreams = pixels.encode_trial(pixels.trial(image, step, keep=True), *image.shape[:2])
    return b"".join(api._file_parts(pixels.MODEL, pixels.NO_WEIGHTS, quality, image.shape[2], image.shape[1],
                                    image.shape[0], substreams, None, None, False))


def test_the_encoders_estimate_is_the_code_length():
    image = drawing()
    found = pixels.trial(image, 3)
    substreams = pixels.encode_trial(pixels.trial(image, 3, keep=True), *image.shape[:2])
    coded = sum(len(s.data) for s in substreams)
    assert abs(coded - found.bits() / 8) <= 8


def test_lossless_estimate_stops_at_its_entropy_bound():
    """The photo gate's estimate: where the histograms' entropy is already above the
    bar, that bound comes back (above the bar, below the estimate); else the estimate."""
    photo = smooth_image(160, 200) // 2 + np.random.default_rng(2).integers(0, 96, (160, 200, 3), dtype=np.uint8)
    estimate = pixels.lossless_bits(photo)
    bound = pixels.lossless_bits(photo, above=estimate / 2)
    assert estimate / 2 < bound <= estimate
    assert pixels.lossless_bits(photo, above=estimate) == estimate
    # Whatever bound it stops at (G's entropy alone, or all three planes'), it answers
    # "more than the bar?" as the estimate does.
    for above in np.linspace(0.05, 1.5, 30) * estimate:
        assert (pixels.lossless_bits(photo, above=above) > above) == (estimate > above)


@pytest.mark.parametrize("shape", [(64, 200), (200, 64)])  # scanned as it is, and on its side
def test_per_column_costs_add_up_to_the_scan(shape):
    image = drawing(*shape)
    found = pixels.trial(image, 4, per_column=True)
    bits, squared = found.columns
    assert bits.shape == squared.shape == (shape[1],)
    description = 8.0 * (len(pixels._parameters(found.step, found.predictor))
                         + sum(len(pixels._spec_bytes(spec)) for spec, _ in found.specs))
    assert bits.sum() == pytest.approx(found.bits() - description)
    assert squared.sum() == found.squared_error
    decoded, _ = _round_trip(image, 4)
    errors = (decoded.astype(int) - image) ** 2
    assert np.array_equal(squared, errors.sum(axis=(0, 2)))
    counted = np.zeros(shape, dtype=bool)
    counted[:shape[0] // 2, :shape[1] // 3] = True  # e.g. a tile cut by an image's edge, FILL elsewhere
    only = pixels.trial(image, 4, per_column=True, counted=counted).columns[1]
    assert np.array_equal(only, (errors * counted[..., None]).sum(axis=(0, 2)))


def test_tables_are_integers_summing_to_the_precision():
    tables = pixels.tables()
    for t in range(pixels.TABLES):
        f = tables.channel(t)
        assert f.min() >= 1 and f.sum() == 1 << 16
    f = pixels.custom_table(np.array([-255, 0, 3, 255]), np.array([0, 61, 5, 9]))
    assert f.min() >= 1 and f.sum() == 1 << 16 and len(f) == 512


def sparse_drawing(height: int = 192, width: int = 256) -> np.ndarray:
    """A few lines on white: far fewer bits as pixels than as any model's latents."""
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    image[height // 2] = 0
    image[:, width // 3] = (200, 0, 0)
    return image


def test_default_encoder_codes_a_drawing_as_pixels_and_a_photo_with_the_model(tiny_hyperprior_weights):
    line_art = sparse_drawing()
    model_file = api.encode_pixels(line_art, 4, tiny_hyperprior_weights, family="hyperprior")
    chosen = api.encode_pixels(line_art, 4, tiny_hyperprior_weights)
    assert container.parse_header(chosen).model_id == pixels.MODEL_ID
    assert len(chosen) <= len(model_file)
    decoded = api.decode_pixels(chosen).pixels  # no weights needed
    from_model = api.decode_pixels(model_file, tiny_hyperprior_weights).pixels
    assert np.sum((decoded.astype(int) - line_art) ** 2) < np.sum((from_model.astype(int) - line_art) ** 2)

    photo = smooth_image(64, 80)
    assert api.encode_pixels(photo, 4, tiny_hyperprior_weights) == api.encode_pixels(
        photo, 4, tiny_hyperprior_weights, family="hyperprior")


def test_a_larger_pixels_file_is_taken_where_it_is_worth_its_bits(monkeypatch):
    """Black text at quality 4, shipped weights, the scan alone (its dictionary coding
    left out): the pixels family's file is larger than the model's, within api.GROWTH of
    it, and better by more than api.SLOPE dB per doubling."""
    huge = pixels.Trial(1, 0, np.zeros((0, 1)), [], predictor=pixels.INTERLEAVED, packed=bytes(1 << 20))
    monkeypatch.setattr(pixels, "dictionary_trial", lambda image, step=1: huge)
    text = np.ascontiguousarray(hardset.generate(["text-black"])["text-black"][:128, :192])
    model_file = api.encode_pixels(text, 4, family="hyperprior")
    chosen = api.encode_pixels(text, 4)
    assert container.parse_header(chosen).model_id == pixels.MODEL_ID
    assert len(model_file) < len(chosen) <= api.GROWTH * len(model_file)
    error = np.sum((api.decode_pixels(chosen).pixels.astype(int) - text) ** 2)
    model_error = np.sum((api.decode_pixels(model_file).pixels.astype(int) - text) ** 2)
    assert 10 * np.log10(model_error / max(error, 1)) >= api.SLOPE * np.log2(len(chosen) / len(model_file))


def test_worth_its_bits_is_lower_j_within_the_growth_and_slope():
    bits, error, weight = 8000.0, 10_000, 0.5
    assert api._worth(bits * 0.9, error // 2, bits, error, weight)  # smaller and closer
    assert not api._worth(bits * 0.5, error * 4, bits, error, weight)  # smaller, but J is higher
    assert api._worth(bits * 1.4, error // 16, bits, error, weight)  # 12 dB for half a doubling
    assert not api._worth(bits * 1.4, error // 2, bits, error, weight)  # 3 dB, but J is higher
    assert api._worth(bits * 1.4, int(error / 1.2), bits, error, 10.0) is False  # J lower, 0.8 dB: under the slope
    assert bits * 1.4 + 10.0 * int(error / 1.2) < bits + 10.0 * error
    assert not api._worth(bits * 1.6, 0, bits, error, weight)  # beyond the growth, even exact


@pytest.mark.parametrize("shape", [(1, 40, 3), (1, 1, 1), (37, 1, 3)])
def test_default_encoder_takes_one_pixel_high_or_wide_images(tiny_hyperprior_weights, shape):
    image = noise(*shape, seed=5)
    data = api.encode_pixels(image, 4, tiny_hyperprior_weights)
    assert api.decode_pixels(data, tiny_hyperprior_weights).pixels.shape == shape


def test_a_one_pixel_image_is_kept_exact_where_that_is_no_larger():
    """The dictionary coding's size is exact (LZMA2's output): no range coder margin, so
    a 1x1 image's exact file (90 bytes) wins over the model's lossy one (94)."""
    image = np.array([[[200, 30, 40]]], np.uint8)
    data = api.encode_pixels(image, 4)
    assert len(data) <= len(api.encode_pixels(image, 4, family="hyperprior"))
    assert np.array_equal(api.decode_pixels(data).pixels, image)


def test_a_tall_image_is_scanned_on_its_side():
    """A tall image's rows are its columns: pass A loops over the shorter side."""
    image = drawing(128, 48)
    decoded, _ = _round_trip(image, 1)
    assert np.array_equal(decoded, image)
    assert abs(pixels.trial(image, 1).bits() - pixels.trial(image.transpose(1, 0, 2).copy(), 1).bits()) < 1e-6


def test_bench_measures_the_pixels_family_alone():
    from nic import bench

    (row,) = bench.run_hard("8", "none", None, "pixels", ["text-black"])
    assert row["family"] == "pixels" and row["ceiling"] is None and row["psnr"] == float("inf")
    assert "| text-black | 8 | pixels |" in bench.hard_table([row])


def test_streamed_encoding_gives_the_same_bytes(tiny_hyperprior_weights):
    from nic.tiling import ArrayRows

    line_art = sparse_drawing()
    assert api.encode_rows(ArrayRows(line_art), 4, tiny_hyperprior_weights)[0] == api.encode_pixels(
        line_art, 4, tiny_hyperprior_weights)


def test_gray_drawing_decodes_to_rgb():
    gray = np.repeat(drawing()[..., :1], 3, axis=2)
    data = api.encode_pixels(gray, 8, family="pixels")
    assert container.parse_header(data).colour == container.COLOUR_GRAY
    assert np.array_equal(api.decode_pixels(data).pixels, gray)


def test_explicit_family_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from nic.cli import cli

    source = tmp_path / "art.png"
    Image.fromarray(drawing()).save(source)
    runner = CliRunner()
    result = runner.invoke(cli, ["encode", str(source), "--model", "pixels", "-q", "8", "-o", str(tmp_path / "a.nic"),
                                 "-v"])
    assert result.exit_code == 0, result.output
    assert "coded as pixels" in result.stderr
    result = runner.invoke(cli, ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), drawing())
    result = runner.invoke(cli, ["info", str(tmp_path / "a.nic")])  # a few lines: the dictionary's smaller
    assert "pixels" in result.output and "pixel coding    dictionary (LZMA2)" in result.output
    golden = Path(__file__).parent / "golden"
    assert "pixel predictor  gradient" in runner.invoke(cli, ["info", str(golden / "pixels-q8.nic")]).output
    median = runner.invoke(cli, ["info", str(golden / "pixels-median-q3.nic")])
    assert "pixel predictor  median" in median.output
    result = runner.invoke(cli, ["encode", str(source), "--model", "pixels", "--weights", "x.npz",
                                 "-o", str(tmp_path / "c.nic")])
    assert result.exit_code == 1 and "has no weights" in result.stderr


def _rewrite(data: bytes, substreams: list[Substream], **header) -> bytes:
    parsed = container.unpack(data)
    payload = b"".join(bytes(p) for p in container.pack_substreams(substreams))
    fields = dict(parsed.header.__dict__, payload_length=len(payload))
    fields.update(header)
    return container.pack(container.Header(**fields), payload, parsed.sections)


def _pset(body: bytes) -> Substream:
    return Substream(b"pset", (1, 1, 1), body + bytes(-len(body) % 4))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("step", [1, 3, 40])
def test_the_dictionary_coding_round_trips_within_half_a_step(channels, step):
    """Pixel values quantized to the step and LZMA2-coded (no scan): exact at step 1,
    each pixel within ±step/2 otherwise, the whole file's bits what the trial said."""
    image = drawing(37, 53)[..., :channels] if channels == 3 else drawing(37, 53)[..., 1:2]
    found = pixels.dictionary_trial(image, step)
    assert found.predictor in pixels.DICTIONARIES
    substreams = pixels.encode_trial(found, 37, 53)
    assert 8 * sum(len(s.data) for s in substreams) == found.bits()
    decoded: list = []
    pixels.decompress(pixels.MODEL, 4, 37, 53, channels == 1, substreams, decoded.append)
    error = np.concatenate(decoded).astype(int) - image
    assert np.abs(error).max() <= step // 2 and int(np.sum(error ** 2)) == found.squared_error


def test_a_higher_effort_compresses_the_dictionary_coding_harder():
    """Efforts 2..4 compress a dictionary coding again with a stronger LZMA2 preset and
    keep the smaller: the same pixels decoded, never more bits; a scan's trial, or
    effort 1, is left as it is."""
    y, x = np.mgrid[0:96, 0:200]
    stripes = np.repeat((((3 * x + 7 * y) % 23 < 9) * 255).astype(np.uint8)[..., None], 3, axis=2)
    found = pixels.dictionary_trial(stripes)
    assert pixels.stronger(found, stripes, 1) is found
    scan = pixels.trial(stripes, 1, keep=True)
    assert pixels.stronger(scan, stripes, 4) is scan
    for effort in (2, 3, 4):
        harder = pixels.stronger(found, stripes, effort)
        assert harder.bits() <= found.bits() and harder.step == found.step
        decoded: list = []
        pixels.decompress(pixels.MODEL, 4, 96, 200, False, pixels.encode_trial(harder, 96, 200), decoded.append)
        assert np.array_equal(np.concatenate(decoded), stripes)
    assert pixels.stronger(found, stripes, 4).bits() < found.bits()
    files = [b"".join(s.data for s in pixels.compress(pixels.MODEL, stripes, 8, effort)) for effort in (1, 4)]
    assert len(files[1]) < len(files[0])


def test_the_default_codes_repeated_text_with_the_dictionary():
    """Text repeats its glyphs, which the scan cannot see: the default's file for black
    text at q4 is lossless, in a dictionary coding, and smaller than the scan's lossless."""
    text = np.ascontiguousarray(hardset.generate(["text-black"])["text-black"][:128, :192])
    chosen = api.encode_pixels(text, 4)
    substreams = container.unpack(chosen).substreams()
    assert pixels.parameters_in(substreams)[1] in pixels.DICTIONARIES
    assert np.array_equal(api.decode_pixels(chosen).pixels, text)
    assert 8 * len(chosen) < pixels.trial(text, 1).bits()


@pytest.mark.parametrize("flat", ["top", "sides"])
def test_the_dictionary_estimate_samples_the_whole_image(flat):
    """An image of noise with a flat band of sky at the top, or flat margins at the sides,
    is judged by all of it, not by its first rows or its edges: the gate's estimate is
    within 2x of the whole image deflated."""
    import zlib

    image = np.random.default_rng(5).integers(0, 256, (400, 3000, 3), dtype=np.uint8)
    if flat == "top":
        image[:16] = 200
    else:
        image[:, :300] = image[:, -300:] = 200
    whole = 8 * len(zlib.compress(image.tobytes(), 1))
    assert whole / 2 < pixels._dictionary_estimate(image) < 2 * whole


def test_the_default_codes_a_chirp_as_a_lossy_dictionary_file():
    """A chirp the model cannot follow (15.6 dB at q4) repeats its values once they are
    quantized: the default searches the dictionary coding over the ladder's steps and
    keeps one above step 1, in fewer bytes than the model's file and far better (37.0
    against 15.6 dB with the shipped weights)."""
    chirp = np.ascontiguousarray(hardset.zone_plate()[:160, :240])
    chosen, model = api.encode_pixels(chirp, 4), api.encode_pixels(chirp, 4, family="hyperprior")
    step, coding, _ = pixels.parameters_in(container.unpack(chosen).substreams())
    assert coding in pixels.DICTIONARIES and step > 1
    errors = [api.decode_pixels(data).pixels.astype(np.int64) - chirp for data in (chosen, model)]
    assert np.abs(errors[0]).max() <= step // 2
    psnr = [10 * np.log10(255**2 / np.mean(error ** 2)) for error in errors]
    assert len(chosen) < len(model) and psnr[0] > psnr[1] + 15


def test_hostile_dictionary_streams_fail_with_one_message():
    image = drawing(24, 32)
    found = pixels.dictionary_trial(image)
    pset, pixl = pixels.encode_trial(found, 24, 32)
    data = found.packed
    cases = {  # garbage, another image's values, a stream cut short, a non-zero byte after its end
        "garbage": data[:9] + bytes(len(data) - 9),
        "another image's": pixels.dictionary_trial(drawing(24, 31)).packed,
        "cut short": data[:len(data) // 2],
        "run on": data + b"\1",
    }
    for name, payload in cases.items():
        stream = Substream(b"pixl", pixl.shape, payload + bytes(-len(payload) % 4))
        with pytest.raises(FormatError) as caught:
            pixels.decompress(pixels.MODEL, 4, 24, 32, False, [pset, stream], lambda rows: None)
        assert str(caught.value).startswith("substream pixl ") and "\n" not in str(caught.value), name


def test_hostile_files_fail_with_one_message(tmp_path):
    image = drawing(24, 32)
    data = _scanned_file(image, pixels.STEPS[6])
    pset, pixl = container.unpack(data).substreams()
    cases = {
        "step 0": [_pset(pset.data[:2] + b"\0" + pset.data[3:]), pixl],
        "predictor 7, which this nic does not know": [_pset(b"\0\7" + pset.data[2:]), pixl],
        "predictor 0, which this nic does not know": [_pset(b"\0\0" + pset.data[2:]), pixl],
        "table 200": [_pset(pset.data[:3] + b"\xc8" + pset.data[4:]), pixl],
        "bytes after its tables": [_pset(pset.data + b"\1\0\0\0"), pixl],
        "ends inside its tables": [_pset(pset.data[:3]), pixl],
        "corrupt": [pset, Substream(b"pixl", pixl.shape, pixl.data[:-4])],
        "needs pset, pixl": [pixl, pset],
    }
    for expected, substreams in cases.items():
        with pytest.raises(FormatError) as caught:
            api.decode_pixels(_rewrite(data, substreams))
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    from click.testing import CliRunner

    from nic.cli import cli

    bad = tmp_path / "bad.nic"
    bad.write_bytes(_rewrite(data, cases["step 0"]))
    result = CliRunner().invoke(cli, ["info", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"nic: error: {bad}: substream pset gives step 0 (1..255)"]
    with pytest.raises(Exception, match="names weights"):
        api.decode_pixels(_rewrite(data, [pset, pixl], weights_hash=b"\1" * 8))


def test_a_file_larger_than_the_family_codes_is_refused():
    data = api.encode_pixels(drawing(24, 32), 6, family="pixels")
    pset, pixl = container.unpack(data).substreams()
    big = _rewrite(data, [pset, Substream(b"pixl", (1, 256, 512), pixl.data)], width=8192, height=4096,
                   latent_shape=(1, 256, 512))
    with pytest.raises(FormatError, match="larger than the family"):
        api.decode_pixels(big)


def test_a_flat_colour_costs_at_most_0_02_bpp_at_every_quality():
    """Issue 21's flat-region target, with the shipped default: 768x512 of one colour."""
    flat = np.empty((512, 768, 3), dtype=np.uint8)
    flat[:] = (120, 160, 200)
    for quality in range(1, 9):
        data = api.encode_pixels(flat, quality)
        assert 8 * len(data) / flat[..., 0].size <= 0.02
        assert np.array_equal(api.decode_pixels(data).pixels, flat)


def test_the_ladder_walk_stops_where_the_cost_rises_and_the_exhaustive_search_does_not():
    """The encoder's search over the step ladder: the walk (effort 1) stops at the first
    coarser step that costs more; above effort 1 every step is priced, since the cost is
    not convex in the step (the zone plate at q4 has a cheaper minimum further on)."""
    costs = [9.0, 5.0, 6.0, 4.5, 7.0, 8.0, 1.0] + [9.0] * (len(pixels.LADDER) - 7)

    class Priced:
        def __init__(self, n: int):
            self.n = n

        def bits(self) -> float:
            return 100.0 - self.n  # every step fits; coarser is smaller

    def cost(found: Priced) -> float:
        return costs[found.n]

    walked = pixels._ladder_cheapest(Priced, 1, 100.0, cost, start=Priced(1))
    searched = pixels._ladder_cheapest(Priced, 1, 100.0, cost, start=Priced(1), exhaustive=True)
    assert (walked.n, searched.n) == (1, 6)
