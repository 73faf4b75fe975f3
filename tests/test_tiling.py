"""Tiled inference (nic.tiling) gives the latents and pixels of whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nic import api, tiling
from nic.factorized import Codec, Config, pad_to_multiple
from nic.weights import default_weights
from conftest import smooth_image


@pytest.fixture(scope="module")
def model():
    return default_weights(family="factorized")[0]


def whole_latents(model, pixels: np.ndarray, quality: int) -> np.ndarray:
    """The pre-tiling quantize_latents: the whole padded image through g_a at once.

    One change: it built x with permute(2, 0, 1).unsqueeze(0), whose stride[0] = 3
    made unpadded images run in NCHW despite .contiguous(channels_last); in another
    layout the sums run in another order (1 latent of 294,912 differs on kodim05 at
    quality 8). Here x has true channels_last strides, like nic.tiling's tiles."""
    x = torch.from_numpy(np.array(pixels, copy=True)).unsqueeze(0).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(1, 3, *x.shape[2:])
    x = pad_to_multiple(x).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = model.analysis(x, quality)[0]
    return np.round(y.to(torch.float64).numpy()).astype(np.int64)


def whole_pixels(model, latents: np.ndarray, quality: int, height: int, width: int, gray: bool) -> np.ndarray:
    """The pre-tiling reconstruct: all latents through g_s at once, then cropped."""
    y_hat = torch.from_numpy(latents.astype(np.float32)).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        x_hat = model.synthesis(y_hat, quality)[0, :, :height, :width]
    if gray:
        x_hat = x_hat.mean(dim=0, keepdim=True)
    x = torch.nan_to_num(x_hat, nan=0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def textured_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """smooth_image plus stripes and blocky noise: many non-zero latents at every quality."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    texture = 40 * np.sin(xx * 0.7 + yy * 0.3)[..., None] + np.kron(
        rng.normal(0, 30, (-(-height // 8), -(-width // 8), channels)), np.ones((8, 8, 1)))[:height, :width]
    return np.clip(smooth_image(height, width, channels, seed) + texture, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


# ---- the halo follows from the architecture -------------------------------------------

def test_halo_arithmetic_of_four_5x5_stride2_layers():
    codec = Codec(Config(N=8, M=8))
    # g_a: latent i reads pixels 16i−30 … 16i+30, i.e. blocks i−2 … i+1.
    assert tiling.analysis_halo(codec.g_a) == (2, 1)
    # g_s: pixels of block i read latents i−1 … i+2.
    assert tiling.synthesis_halo(codec.g_s) == (1, 2)


def test_tile_grid_covers_the_latents_once():
    assert tiling.tiles(3, 5, 16 * 100) == [((0, 3), (0, 5))]  # fits: one tile, whole-image inference
    grid = tiling.tiles(10, 7, 64)
    covered = np.zeros((10, 7), dtype=int)
    for (r0, r1), (c0, c1) in grid:
        assert 0 < r1 - r0 <= 4 and 0 < c1 - c0 <= 4
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()
    assert [r for r, _ in grid[::2]] == [(0, 3), (3, 6), (6, 10)]  # near-equal, no sliver
    for bad in (0, 8, 100):
        with pytest.raises(ValueError, match="multiple of 16"):
            tiling.tiles(4, 4, bad)


# ---- tiled == whole image ---------------------------------------------------------------

@pytest.mark.parametrize("quality", [1, 4, 8])
def test_tiled_latents_and_pixels_equal_whole_image(model, quality):
    pixels = textured_image(160, 224, seed=quality)
    whole = whole_latents(model, pixels, quality)
    assert np.count_nonzero(whole) > 0.02 * whole.size  # a test with content
    tiled = tiling.quantize_tiled(model, pixels, quality, tile=64)
    assert len(tiling.tiles(*whole.shape[1:], 64)) == 12
    changed = int(np.count_nonzero(tiled != whole))
    assert changed == 0, f"{changed} of {whole.size} latents differ"

    ref = whole_pixels(model, whole, quality, 160, 224, False)
    out = tiling.reconstruct_tiled(model, whole, quality, 160, 224, False, tile=64)
    assert out.dtype == np.uint8 and out.shape == (160, 224, 3)
    assert np.abs(out.astype(int) - ref).max() <= 1
    assert abs(psnr(out, pixels) - psnr(ref, pixels)) < 0.01


@pytest.mark.parametrize("height,width", [(1, 1), (17, 33), (3, 1000), (47, 16)])
@pytest.mark.parametrize("channels", [3, 1])
def test_odd_sizes(model, height, width, channels):
    pixels = textured_image(height, width, channels, seed=height + width)
    quality = 3
    whole = whole_latents(model, pixels, quality)
    ref = whole_pixels(model, whole, quality, height, width, channels == 1)
    for tile in ((16, 48) if max(height, width) < 100 else (128, 256)):
        tiled = tiling.quantize_tiled(model, pixels, quality, tile=tile)
        assert tiled.shape == whole.shape and tiled.dtype == np.int64
        assert np.count_nonzero(tiled != whole) == 0
        out = tiling.reconstruct_tiled(model, whole, quality, height, width, channels == 1, tile=tile)
        assert out.shape == (height, width, channels)
        assert np.abs(out.astype(int) - ref).max() <= 1
        assert abs(psnr(out, pixels) - psnr(ref, pixels)) < 0.01


def test_a_smaller_halo_is_not_enough(model, monkeypatch):
    """The computed halo is needed: one latent less on the side that needs it and
    tiles no longer reproduce the whole image."""
    pixels = textured_image(96, 128, seed=5)
    whole = whole_latents(model, pixels, 4)
    ref = whole_pixels(model, whole, 4, 96, 128, False)
    g_a_halo, g_s_halo = tiling.analysis_halo(model.g_a), tiling.synthesis_halo(model.g_s)

    monkeypatch.setattr(tiling, "analysis_halo", lambda g_a: (g_a_halo[0] - 1, g_a_halo[1]))
    assert np.count_nonzero(tiling.quantize_tiled(model, pixels, 4, tile=48) != whole) > 0
    monkeypatch.setattr(tiling, "analysis_halo", lambda g_a: (g_a_halo[0], g_a_halo[1] - 1))
    assert np.count_nonzero(tiling.quantize_tiled(model, pixels, 4, tile=48) != whole) > 0

    monkeypatch.setattr(tiling, "synthesis_halo", lambda g_s: (g_s_halo[0], g_s_halo[1] - 1))
    out = tiling.reconstruct_tiled(model, whole, 4, 96, 128, False, tile=48)
    assert np.abs(out.astype(int) - ref).max() > 1
    monkeypatch.setattr(tiling, "synthesis_halo", lambda g_s: (g_s_halo[0] - 1, g_s_halo[1]))
    out = tiling.reconstruct_tiled(model, whole, 4, 96, 128, False, tile=48)
    assert np.abs(out.astype(int) - ref).max() > 1


# ---- the container does not know about tiles ----------------------------------------------

def test_encoded_tiled_decodes_untiled_and_back(monkeypatch):
    pixels = textured_image(200, 300, seed=11)
    assert 300 <= tiling.DEFAULT_TILE  # the default path for this image is one tile
    untiled_file = api.encode_pixels(pixels, 4, family="factorized")
    untiled_pixels = api.decode_pixels(untiled_file).pixels

    monkeypatch.setattr(tiling, "DEFAULT_TILE", 96)  # forced: 3x4 tiles of 6x6 latents
    tiled_file = api.encode_pixels(pixels, 4, family="factorized")
    tiled_pixels = api.decode_pixels(untiled_file).pixels  # untiled encode → tiled decode
    assert tiled_file == untiled_file  # the same bytes: tiles are invisible in the file
    monkeypatch.undo()

    # tiled encode → untiled decode
    assert np.array_equal(api.decode_pixels(tiled_file).pixels, untiled_pixels)
    assert np.abs(tiled_pixels.astype(int) - untiled_pixels).max() <= 1
    assert abs(psnr(tiled_pixels, pixels) - psnr(untiled_pixels, pixels)) < 0.01


# ---- details ----------------------------------------------------------------------------------

def test_progress_counts_tiles(model):
    pixels = smooth_image(40, 70, seed=2)
    seen = []
    latents = tiling.quantize_tiled(model, pixels, 2, tile=32, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    seen.clear()
    tiling.reconstruct_tiled(model, latents, 2, 40, 70, False, tile=32, progress=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (6, 6) and len(seen) == 6


def test_read_only_input_and_non_finite_output(tiny_weights):
    from nic.weights import load_weights

    tiny = load_weights(tiny_weights)[0]
    pixels = smooth_image(20, 20)
    pixels.setflags(write=False)  # as np.asarray(PIL image) gives
    assert tiling.quantize_tiled(tiny, pixels, 1).shape == (16, 2, 2)
    broken = Codec(Config(N=16, M=16)).eval()
    with torch.no_grad():
        broken.gain.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        tiling.quantize_tiled(broken, pixels, 1)


def test_float_pixels_become_bytes_whatever_the_synthesis_gives():
    x = np.array([[[np.nan, np.inf, -np.inf, -0.0, 0.5 / 255, 1.5 / 255, 254.5 / 255, 1.2, -3.0]]],
                 dtype=np.float32)
    np.testing.assert_array_equal(tiling.to_pixels(x), [[[0, 255, 0, 0, 0, 2, 254, 255, 0]]])


# ---- strip sources and latent stores (bounded memory for huge images) -------------------------

class ChunkedRows:
    """A PixelRows that hands out at most ``chunk`` rows per read, like a file reader."""

    def __init__(self, pixels: np.ndarray, chunk: int):
        self.pixels, self.chunk, self.position = pixels, chunk, 0
        self.height, self.width, self.channels = pixels.shape

    def read(self, count: int) -> np.ndarray:
        start = self.position
        self.position = min(self.height, start + min(count, self.chunk))
        return self.pixels[start:self.position].copy()


@pytest.mark.parametrize("family", [None, "hyperprior"])  # None reads the image whole (nic.pixels)
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_rows_read_in_strips_give_the_same_file(chunk, family):
    pixels = smooth_image(150, 90, seed=4)
    reference = api.encode_pixels(pixels, 3, family=family)
    previous = tiling.DEFAULT_TILE
    try:
        tiling.DEFAULT_TILE = 48  # several tile rows, each with its halo re-read
        parts = api.encode_rows(ChunkedRows(pixels, chunk), 3, family=family)
        spilled = api.encode_rows(ChunkedRows(pixels, chunk), 3, spill_bytes=0, family=family)
    finally:
        tiling.DEFAULT_TILE = previous
    assert b"".join(bytes(p) for p in parts) == reference
    assert b"".join(bytes(p) for p in spilled) == reference


@pytest.mark.parametrize("gray", [False, True])
def test_a_window_decodes_to_the_pixels_of_the_whole_image(model, gray):
    """reconstruct_window: a window of the image from the latents that reach it, at the
    image's borders and inside, is the whole image's pixels there (to a level, where a
    sum lies within float rounding of a half)."""
    pixels = textured_image(100, 150, 1 if gray else 3, seed=4)
    latents = tiling.quantize_tiled(model, pixels, 4)
    whole = tiling.reconstruct_tiled(model, latents, 4, 100, 150, gray)
    store = tiling.LatentStore(latents.shape, array=latents)
    for r0, r1, c0, c1 in [(0, 100, 0, 150), (0, 64, 64, 150), (40, 70, 20, 90), (64, 100, 0, 64)]:
        window = tiling.reconstruct_window(model, store, 4, gray, r0, r1, c0, c1)
        assert window.shape == (r1 - r0, c1 - c0, 1 if gray else 3)
        assert np.abs(window.astype(int) - whole[r0:r1, c0:c1]).max() <= 1
        assert np.mean(window != whole[r0:r1, c0:c1]) < 1e-3


def test_rows_decoded_in_strips_equal_the_whole_image():
    pixels = smooth_image(100, 70, channels=1, seed=5)
    data = api.encode_pixels(pixels, 5, family="factorized")
    whole = api.decode_pixels(data)
    for spill in (None, 0):
        strips, opened = [], []

        def open_sink(header, icc, exif):
            opened.append(header)
            return strips.append

        previous = tiling.DEFAULT_TILE
        try:
            tiling.DEFAULT_TILE = 32
            header = api.decode_rows(data, open_sink, spill_bytes=spill)
        finally:
            tiling.DEFAULT_TILE = previous
        assert opened == [header] and header.height == 100
        assert len(strips) > 1 and all(s.shape[1:] == (70, 1) for s in strips)
        assert np.array_equal(np.concatenate(strips), whole.pixels)


def test_spilled_latents_match_memory():
    rng = np.random.default_rng(0)
    values = rng.integers(-2**31 + 1, 2**31 - 1, size=(5, 7, 9)).astype(np.int64)
    with tiling.SpilledLatents(values.shape) as spilled:
        for r0, r1 in ((0, 3), (3, 7)):
            for c0, c1 in ((0, 4), (4, 9)):
                spilled.put(slice(r0, r1), slice(c0, c1), values[:, r0:r1, c0:c1])
        spilled.finish()
        for c in range(5):
            assert np.array_equal(spilled.channel(c), values[c].reshape(-1))
        assert np.array_equal(spilled.rows(2, 5), values[:, 2:5])
        flat = np.array([0, 64, 200, 314])
        spilled.patch(flat, np.array([1, 2, 3, 4]))
        expected = values.reshape(-1).copy()
        expected[flat] = [1, 2, 3, 4]
        assert np.array_equal(np.stack([spilled.channel(c) for c in range(5)]).reshape(-1), expected)


def test_rows_out_of_order_are_refused():
    window = tiling._RowWindow(ChunkedRows(smooth_image(40, 8), 5))
    window.rows(10, 20)
    with pytest.raises(ValueError, match="in order"):
        window.rows(5, 12)
    with pytest.raises(ValueError, match="ended"):
        window.rows(30, 41)
