"""The generated hard-content set (nic.hardset)."""

from __future__ import annotations

import numpy as np
import pytest

from nic import hardset


def test_every_image_is_kodak_sized_rgb_and_the_same_each_time():
    first, second = hardset.generate(), hardset.generate()
    assert list(first) == list(hardset.IMAGES)
    for name, pixels in first.items():
        assert pixels.shape == (hardset.HEIGHT, hardset.WIDTH, 3) and pixels.dtype == np.uint8, name
        assert np.array_equal(pixels, second[name]), name
        assert name == "flat" or pixels.std() > 5, name  # something to code


def test_text_is_gray_on_the_black_and_white_page():
    page = hardset.generate(["text-black"])["text-black"]
    assert (page[..., 0] == page[..., 1]).all() and (page[..., 1] == page[..., 2]).all()
    assert (page == 0).any() and (page == 255).mean() > 0.5


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown hard-content image nope"):
        hardset.generate(["flat", "nope"])
