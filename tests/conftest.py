"""Shared fixtures. Nothing here reads ../shared: test images are generated."""

from __future__ import annotations

import numpy as np
import pytest


def icc_profile(tag: bytes, space: bytes = b"RGB ") -> bytes:
    """Bytes an ICC profile's header says describe ``space`` (b"RGB ", b"GRAY", b"CMYK"),
    ``tag`` after it: what nic checks of a profile before it stores one."""
    header = bytearray(128)
    header[16:20] = space
    return bytes(header) + tag


def smooth_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like uint8 image: gradients, a disc and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = [
        128 + 100 * np.sin(xx / max(width, 1) * 3.1 + c) * np.cos(yy / max(height, 1) * 2.3 - c)
        for c in range(channels)
    ]
    img = np.stack(base, axis=-1)
    disc = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(height, width) / 4) ** 2
    img[disc] = img[disc] * 0.5 + 60
    img += rng.normal(0, 4, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path):
    """A folder of six small generated photos to train on."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(smooth_image(48 + 8 * i, 64, seed=i)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture
def rgb_image() -> np.ndarray:
    return smooth_image(48, 64)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """A small random-init model (N=M=16) with exported tables: fast, and not the shipped one."""
    import torch

    from nic.factorized import Codec, Config, to_arrays
    from nic.weights import save_weights

    torch.manual_seed(0)
    model = Codec(Config(N=16, M=16)).eval()
    model.export_tables()
    path = tmp_path_factory.mktemp("weights") / "tiny.npz"
    save_weights(to_arrays(model), path)
    return str(path)


def tiny_hyperprior(seed: int = 0, **context):
    """A small random-init hyperprior model (N=M=16, hyper N=16, Z=8) with exported tables.
    With ``context`` fields of the config (nic.context), its context networks give
    corrections that are not zero, and are calibrated on a smooth image."""
    import torch

    from nic import factorized, hyperprior

    torch.manual_seed(seed)
    base = factorized.Codec(factorized.Config(N=16, M=16)).eval()
    base.export_tables()
    model = hyperprior.Codec(base, hyperprior.Config(hyper_N=16, Z=8, **context)).eval()
    with torch.no_grad():  # means and scale indices that vary, as a trained h_s gives
        model.hyper[2].h_s[4].bias[16:] += 12.0
        for net in model.context[2].nets.values() if context else ():
            net.out.weight.normal_(0, 0.05)
            net.out.bias.normal_(0, 0.3)
    calibration = None
    if context:
        calibration = [torch.from_numpy(hyperprior.analysis(model, smooth_image(96, 128), 3))[None]] * model.qualities
    model.export_tables(calibration)
    return model


@pytest.fixture(scope="session")
def tiny_hyperprior_weights(tmp_path_factory) -> str:
    from nic.hyperprior import to_arrays
    from nic.weights import save_weights

    path = tmp_path_factory.mktemp("weights") / "tiny-hyperprior.npz"
    save_weights(to_arrays(tiny_hyperprior()), path)
    return str(path)


def tiny_context_model(slices: int = 2, checkerboard: bool = True, seed: int = 0):
    """A tiny hyperprior with context (nic.context) whose networks' corrections are not zero."""
    return tiny_hyperprior(seed, slices=slices, checkerboard=checkerboard, context_width=8, context_kernel=3)


@pytest.fixture(scope="session")
def tiny_context_weights(tmp_path_factory) -> str:
    from nic.hyperprior import to_arrays
    from nic.weights import save_weights

    path = tmp_path_factory.mktemp("weights") / "tiny-context.npz"
    save_weights(to_arrays(tiny_context_model()), path)
    return str(path)
