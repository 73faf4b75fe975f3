"""The input policy of nic.images: what a Pillow image becomes before it is coded."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

import nic
from nic.container import profile_for
from nic.images import read_image, read_image_with_metadata
from conftest import icc_profile, smooth_image


def test_16_bit_pgm_is_scaled_by_its_depth_not_its_content():
    """Pillow gives a PGM of maxval above 255 as mode I on a 0..65535 scale: a dark one
    must stay dark, not be read as 8-bit because no sample is above 255."""
    ramp = (np.arange(48 * 64) % 228).astype(np.uint16).reshape(48, 64)
    dark = read_image(b"P5\n64 48\n65535\n" + (ramp // 2).astype(">u2").tobytes())
    bright = read_image(b"P5\n64 48\n65535\n" + (ramp * 257).astype(">u2").tobytes())
    assert dark.max() == 0 and bright.max() == 227
    tenbit = read_image(b"P5\n64 48\n1023\n" + (ramp * 4).astype(">u2").tobytes())  # Pillow scales to 0..65535
    assert abs(int(tenbit.max()) - round(227 * 4 * 255 / 1023)) <= 1


def test_cmyk_input_keeps_no_cmyk_profile():
    """A CMYK JPEG is coded as RGB; its CMYK profile goes (used for the conversion where
    LittleCMS can read it) and the file describes sRGB pixels."""
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(24, 32)).convert("CMYK").save(buffer, "JPEG", quality=95,
                                                               icc_profile=icc_profile(b"x", b"CMYK"))
    pixels, profile, _ = read_image_with_metadata(buffer.getvalue())
    assert pixels.shape == (24, 32, 3) and profile_for(profile, 3) is None
    with Image.open(io.BytesIO(buffer.getvalue())) as im:
        assert "icc_profile" not in nic.decode(nic.encode(im, quality=2)).info


def test_formats_outside_pillows_first_five_still_open():
    """Pillow's PNG, JPEG, GIF, BMP and PPM readers are tried before its other plugins
    load; TIFF and WebP then still open."""
    pixels = smooth_image(12, 20)
    for fmt in ("TIFF", "WEBP", "BMP", "GIF"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        read = read_image(buffer.getvalue())
        assert read.shape == (12, 20, 3)
        if fmt != "GIF":
            assert np.array_equal(read, pixels)


def test_float_samples_within_0_to_1_are_read_as_0_to_1():
    """Image editors write float TIFFs on 0..1; read as 0..255 they came out black."""
    ramp = np.linspace(0, 1, 24 * 40, dtype=np.float32).reshape(24, 40)
    for values, top in ((ramp, 255), (ramp * 255, 255), (ramp * 0.5, 128)):
        buffer = io.BytesIO()
        Image.fromarray(values, "F").save(buffer, "TIFF")
        assert read_image(buffer.getvalue()).max() == top
