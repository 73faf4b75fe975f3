"""Pixel tiles over a model's file (nic.overlay): the tile map, files with an overlay
through the API and the streaming decoder, hostile overlays, and the default's choice."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import smooth_image
from nic import api, container, hardset, overlay
from nic.container import FormatError, Substream
from nic.weights import load_weights


def test_the_tile_map_round_trips_and_refuses_anything_else():
    tiles = np.zeros((3, 5), dtype=bool)
    tiles[0, 1] = tiles[2, 4] = True
    stream = overlay.pack_map(tiles)
    assert len(stream.data) == 4 and stream.shape == (1, 3, 5)
    np.testing.assert_array_equal(overlay.unpack_map(stream, 150, 300), tiles)
    bad = {
        "shape": Substream(b"tmap", (1, 3, 4), stream.data),
        "length": Substream(b"tmap", (1, 3, 5), stream.data + bytes(4)),
        "padding": Substream(b"tmap", (1, 3, 5), stream.data[:3] + b"\x01"),
        "beyond": Substream(b"tmap", (1, 3, 5), stream.data[:1] + b"\x80" + stream.data[2:]),
        "empty": Substream(b"tmap", (1, 3, 5), bytes(4)),
    }
    for what, hostile in bad.items():
        with pytest.raises(FormatError, match="tmap"):
            overlay.unpack_map(hostile, 150, 300)


def _with_text(image: np.ndarray, rows: int = 96) -> np.ndarray:
    """``image`` with a band of black text on white across its last ``rows`` rows."""
    out = image.copy()
    out[-rows:] = hardset.text_black()[:rows, :out.shape[1]]
    return out


def _overlay_file(weights: str, image: np.ndarray, tiles: np.ndarray, step: int, quality: int = 3) -> bytes:
    model, digest = load_weights(weights, coding=True)
    return api._overlay_file(image, overlay.Choice(tiles, step), model, digest, quality, None, image.shape[2])


def test_an_overlay_decodes_its_tiles_over_the_model(tiny_hyperprior_weights, tmp_path):
    image = _with_text(smooth_image(160, 200))
    tiles = np.zeros(overlay.grid(160, 200), dtype=bool)
    tiles[2, 0] = tiles[2, 3] = True  # the last tile row (rows 128..159) and column (192..199) are partial
    data = _overlay_file(tiny_hyperprior_weights, image, tiles, step=1)
    names = [s.name for s in container.unpack(data).substreams()]
    assert names == [b"tmap", b"pset", b"pixl", b"zhat", b"yhat"]
    decoded = api.decode_pixels(data, tiny_hyperprior_weights).pixels
    for rows, cols in overlay.tile_slices(tiles):
        np.testing.assert_array_equal(decoded[rows, cols], image[rows, cols])  # step 1: lossless
    # Elsewhere, the model's decode of the image with those tiles flattened.
    model, digest = load_weights(tiny_hyperprior_weights, coding=True)
    alone = api.decode_pixels(api.encode_pixels(overlay.flattened(image, tiles), 3, tiny_hyperprior_weights,
                                                family="hyperprior"), tiny_hyperprior_weights).pixels
    outside = ~np.repeat(np.repeat(tiles, 64, axis=0), 64, axis=1)[:160, :200]
    np.testing.assert_array_equal(decoded[outside], alone[outside])
    path = tmp_path / "overlay.nic"
    path.write_bytes(data)
    info = subprocess.run([sys.executable, "-m", "nic", "info", str(path)], capture_output=True, text=True)
    assert "2 of 12 (64x64), step 1" in info.stdout
    # The streaming decoder pastes the same tiles, strip by strip.
    rows: list[np.ndarray] = []
    api.decode_rows(data, lambda header, icc, exif: rows.append, tiny_hyperprior_weights)
    np.testing.assert_array_equal(np.concatenate(rows), decoded)


def test_a_gray_overlay_stays_gray(tiny_hyperprior_weights):
    image = _with_text(smooth_image(128, 128))[..., 1:2]
    tiles = np.zeros(overlay.grid(128, 128), dtype=bool)
    tiles[1, 1] = True
    data = _overlay_file(tiny_hyperprior_weights, image, tiles, step=4)
    decoded = api.decode_pixels(data, tiny_hyperprior_weights).pixels
    assert decoded.shape == (128, 128, 1)
    assert np.abs(decoded[64:, 64:].astype(int) - image[64:, 64:]).max() <= 2  # within half the step


def test_hostile_overlays_fail_with_one_message(tiny_hyperprior_weights):
    image = _with_text(smooth_image(128, 192))
    tiles = np.zeros(overlay.grid(128, 192), dtype=bool)
    tiles[1, 2] = True
    parsed = container.unpack(_overlay_file(tiny_hyperprior_weights, image, tiles, step=2))
    streams = parsed.substreams()

    def rewritten(changed: list[Substream]) -> bytes:
        return b"".join(api._file_parts(load_weights(tiny_hyperprior_weights, coding=True)[0],
                                        parsed.header.weights_hash, 3, 3, 192, 128, changed, None, None))

    cases = {
        "no tile": [Substream(b"tmap", streams[0].shape, bytes(4)), *streams[1:]],
        "a pixel stream cut short": [streams[0], streams[1], Substream(b"pixl", streams[2].shape,
                                                                       streams[2].data[:-4]), *streams[3:]],
        "no pixel tables": [streams[0], *streams[2:]],
    }
    for what, changed in cases.items():
        with pytest.raises(FormatError):
            api.decode_pixels(rewritten(changed), tiny_hyperprior_weights)


def _captioned(image: np.ndarray, rows: int) -> np.ndarray:
    """``image`` with a caption: two lines of black text on a white band of ``rows`` rows."""
    from PIL import Image, ImageDraw, ImageFont

    out = Image.fromarray(image)
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, image.shape[0] - rows, image.shape[1], image.shape[0]), fill=(255, 255, 255))
    for line, text in enumerate(("Figure 2: a harbour at dawn, seen from the east pier",
                                 "generated for nic's tests; no photograph was harmed")):
        draw.text((8, image.shape[0] - rows + 12 + 40 * line), text, fill=(0, 0, 0), font=ImageFont.load_default(16))
    return np.asarray(out).copy()


def test_the_default_puts_pixel_tiles_over_a_caption():
    """A photo-like image with a caption band: the default keeps the model for the photo
    and codes the caption's tiles as pixels, much closer to the original there. A gray
    image is looked at as its all-gray RGB version is. (Quality 3: quality 4's networks,
    trained end to end with generated text, code this caption well enough at the top.)"""
    image = _captioned(hardset.photo_like()[:256, :384], rows=128)
    gray = image[..., 1:2]
    assert overlay.candidates(gray).any()
    np.testing.assert_array_equal(overlay.candidates(np.repeat(gray, 3, axis=2)), overlay.candidates(gray))
    data = api.encode_pixels(image, 3)
    assert [s.name for s in container.unpack(data).substreams()][0] == b"tmap"
    model = api.encode_pixels(image, 3, family="hyperprior")
    band = slice(-128, None)
    error = np.mean((api.decode_pixels(data).pixels[band].astype(int) - image[band]) ** 2)
    model_error = np.mean((api.decode_pixels(model).pixels[band].astype(int) - image[band]) ** 2)
    assert error < model_error / 4
    assert len(data) <= api.GROWTH * len(model)
    # Captioned at the top instead: the model's decode for the choice stops below the caption.
    top = np.ascontiguousarray(image[::-1])
    top[:128] = image[-128:]
    assert container.unpack(api.encode_pixels(top, 3)).substreams()[0].name == b"tmap"


def test_an_exact_pixels_file_no_larger_than_an_overlay_replaces_it():
    """A screenshot at quality 1: the pixels family's estimates said no (text's repeats lie
    far apart), the overlay beat the model's file, and the exact file is smaller still:
    the default keeps the exact one, so quality 1 is not larger than quality 2."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (384, 256), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, 384, 24], fill=(40, 60, 120))
    draw.text((8, 6), "nic - a learned codec", fill="white")
    for line in range(12):
        draw.text((10, 34 + line * 18), f"line {line}: the quick brown fox jumps over the lazy dog 0123456789",
                  fill=(0, 0, 0))
    pixels = np.asarray(image).copy()
    exact = api.encode_pixels(pixels, 8, family="pixels")
    data = api.encode_pixels(pixels, 1)
    assert len(data) <= len(exact) and len(data) <= len(api.encode_pixels(pixels, 2))
    np.testing.assert_array_equal(api.decode_pixels(data).pixels, pixels)


def test_photos_without_such_tiles_are_not_looked_at():
    assert not overlay.candidates(hardset.photo_like()).any()
    assert not overlay.candidates(smooth_image(200, 300)).any()
