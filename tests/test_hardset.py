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


def test_random_crops_for_training_are_varied_and_reproducible():
    first = [hardset.random_crop(np.random.default_rng(3), 64) for _ in range(1)]
    crops = [hardset.random_crop(np.random.default_rng(seed), 64) for seed in range(40)]
    assert all(hardset.random_crop(np.random.default_rng(seed), 16).shape == (16, 16, 3) for seed in range(40))
    assert np.array_equal(first[0], crops[3])
    assert all(c.shape == (64, 64, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 40
    assert sum(c.std() < 1 for c in crops) < 20  # flat ones, but not mostly


def test_the_training_sampler_mixes_them_in():
    import random

    from nic.train import CropSampler

    photo = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    sampler = CropSampler([photo], 64, random.Random(0), synthetic=1.0)
    batch = sampler.batch(4)
    assert batch.shape == (4, 3, 64, 64) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    with pytest.raises(ValueError, match="synthetic share"):
        CropSampler([photo], 64, random.Random(0), synthetic=1.5)
