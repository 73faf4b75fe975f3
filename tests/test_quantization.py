"""Entropy-constrained quantization (encoder effort levels), nic.quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nic.api import decode_pixels, encode_pixels
from nic.factorized import coder
from nic.quantization import EFFORTS, TableRate, image_cost, quantize
from nic.weights import default_weights
from conftest import smooth_image


@pytest.fixture(scope="module")
def shipped():
    model, _ = default_weights(None, "factorized")
    return model


def test_table_rate_is_the_coded_length(shipped):
    """The rate the search minimizes is what the range coder spends (escapes included)."""
    rng = np.random.default_rng(1)
    quality = 3
    latents = rng.integers(-3, 4, size=(shipped.config.M, 5, 7))
    latents[0, 0, 0] = 100_000  # far outside every table: escape + bypass bits
    latents[5, 2, 3] = -7_000
    bits = float(TableRate(shipped.tables[quality - 1])(torch.from_numpy(latents)).sum())
    coded = 8 * len(coder(shipped, quality).encode(latents))
    # The flush adds at most two 32-bit words; it also writes only the words needed to
    # land inside the final interval, so one message can end up below its information
    # content by less than a word (these weights: 84,384 bits for 84,385.85).
    assert bits - 32 < coded <= bits + 64


@pytest.mark.parametrize("effort", EFFORTS)
def test_every_effort_round_trips(effort):
    pixels = smooth_image(40, 56, seed=effort)
    data = encode_pixels(pixels, quality=4, effort=effort, family="factorized")
    decoded = decode_pixels(data)
    model, _ = default_weights(None, "factorized")
    assert np.array_equal(decoded.latents, quantize(model, pixels, 4, effort))
    assert decoded.pixels.shape == pixels.shape


def test_grayscale_effort_round_trips():
    pixels = smooth_image(33, 17, channels=1)
    decoded = decode_pixels(encode_pixels(pixels, quality=2, effort=3, family="factorized"))
    assert decoded.pixels.shape == (33, 17, 1)


@pytest.mark.parametrize("quality", [1, 8])
def test_higher_effort_never_raises_the_cost(shipped, quality):
    """J = bits + λ·255²·SSE/3 is non-increasing in the effort on a one-tile image."""
    pixels = smooth_image(64, 96, seed=quality)
    costs = []
    for effort in EFFORTS:
        bits, distortion = image_cost(shipped, pixels, quantize(shipped, pixels, quality, effort), quality)
        costs.append(bits + distortion)
    assert all(later <= earlier + 1e-6 for earlier, later in zip(costs, costs[1:])), costs
    assert costs[-1] < costs[0]  # and the search does find something on a real-looking image


@pytest.mark.parametrize("family", ["factorized", None])  # None: the default, with context
def test_effort_bytes_are_deterministic_across_runs_and_threads(family):
    from nic import engine

    pixels = smooth_image(48, 64, seed=7)
    threads, engine_threads = torch.get_num_threads(), engine.threads()
    try:
        outputs = []
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            engine.set_threads(count)
            outputs.append(encode_pixels(pixels, quality=5, effort=3 if family else 2, family=family))
    finally:
        torch.set_num_threads(threads)
        engine.set_threads(engine_threads)
    assert outputs[0] == outputs[1] == outputs[2]


def test_effort_outside_range_is_refused():
    with pytest.raises(ValueError, match="effort"):
        encode_pixels(smooth_image(16, 16), quality=4, effort=5)


def test_multi_tile_image_round_trips(monkeypatch):
    """Tiles of the search see their neighbours' final latents; the result still decodes."""
    import nic.quantization as quantization

    monkeypatch.setattr(quantization, "TILE_LATENTS", 2)
    pixels = smooth_image(80, 72, seed=3)
    model, _ = default_weights(None, "factorized")
    latents = quantize(model, pixels, 6, 2)
    bits, distortion = image_cost(model, pixels, latents, 6)
    rounded = quantize(model, pixels, 6, 1)
    assert bits + distortion <= sum(image_cost(model, pixels, rounded, 6)) + 1e-6
    data = encode_pixels(pixels, quality=6, effort=2, family="factorized")
    assert decode_pixels(data).pixels.shape == pixels.shape


def test_shipped_weights_have_a_finetuned_decoder(shipped):
    """The default weights are the ones whose decoder was retrained on rounded latents."""
    assert shipped.config.decoder_finetuned


def test_effort_through_the_python_api_and_pillow(tmp_path):
    import nic
    from PIL import Image

    image = Image.fromarray(smooth_image(32, 48, seed=2))
    assert nic.decode(nic.encode(image, quality=3, effort=2)).size == (48, 32)
    image.save(tmp_path / "x.nic", quality=3, effort=2)
    assert (tmp_path / "x.nic").read_bytes() == nic.encode(image, quality=3, effort=2)


def test_cli_effort_option(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from nic.cli import cli

    Image.fromarray(smooth_image(32, 32, seed=4)).save(tmp_path / "in.png")
    result = CliRunner().invoke(cli, ["encode", str(tmp_path / "in.png"), "-q", "2", "-e", "2", "-v",
                                      "-o", str(tmp_path / "out.nic")])
    assert result.exit_code == 0, result.output
    assert "effort 2" in result.output
    assert CliRunner().invoke(cli, ["decode", str(tmp_path / "out.nic"), "-o", str(tmp_path / "out.png")]).exit_code == 0
    bad = CliRunner().invoke(cli, ["encode", str(tmp_path / "in.png"), "-e", "9", "-o", str(tmp_path / "x.nic")])
    assert bad.exit_code == 2 and not (tmp_path / "x.nic").exists()
