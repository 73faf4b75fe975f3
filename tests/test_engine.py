"""nic.engine (the transforms in numpy) against torch, and coding without torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import smooth_image
from nic import engine, factorized
from nic.layers import GDN
from nic.tiling import quantize_tiled, reconstruct_tiled
from nic.weights import load_weights


def _torch_hwc(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0))
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("channels, out_channels, k, stride, height, width", [
    (3, 16, 5, 2, 20, 26),  # few input channels: one im2col group
    (16, 24, 5, 2, 9, 14),  # odd sizes
    (16, 8, 3, 1, 7, 5),  # stride 1 (the hyper-analysis's first layer)
    (24, 2, 5, 2, 12, 10),  # few output channels: products shifted and summed
])
def test_convolution_matches_torch(channels, out_channels, k, stride, height, width):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(channels, out_channels, k, stride=stride, padding=k // 2)
    x = np.random.default_rng(0).normal(size=(height, width, channels)).astype(np.float32)
    mine = engine.Conv(layer.weight.detach().numpy(), layer.bias.detach().numpy(), stride)(x)
    np.testing.assert_allclose(mine, _torch_hwc(layer, x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("channels, out_channels, height, width", [(16, 24, 5, 7), (24, 3, 6, 4), (8, 8, 1, 1)])
def test_transposed_convolution_matches_torch(channels, out_channels, height, width):
    torch.manual_seed(1)
    layer = torch.nn.ConvTranspose2d(channels, out_channels, 5, stride=2, padding=2, output_padding=1)
    x = np.random.default_rng(1).normal(size=(height, width, channels)).astype(np.float32)
    mine = engine.Deconv(layer.weight.detach().numpy(), layer.bias.detach().numpy(), 2)(x)
    assert mine.shape == (2 * height, 2 * width, out_channels)
    np.testing.assert_allclose(mine, _torch_hwc(layer, x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("inverse", [False, True])
def test_gdn_matches_torch(inverse):
    torch.manual_seed(2)
    layer = GDN(8, inverse=inverse)
    with torch.no_grad():  # away from the fresh identity, and some parameters under their bound
        layer.gamma.add_(torch.rand(8, 8) * 0.1)
        layer.beta[0] = -0.5
    x = np.random.default_rng(2).normal(size=(5, 6, 8)).astype(np.float32)
    mine = engine.GDN.from_parameters(layer.beta.detach().numpy(), layer.gamma.detach().numpy(), inverse)(x.copy())
    np.testing.assert_allclose(mine, _torch_hwc(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_model_codes_as_the_torch_network_does(tiny_weights, channels):
    """The numpy model and the torch Codec of the same weights: the same integers, and
    pixels at most one level apart (float rounding, another summation order)."""
    coding, _ = load_weights(tiny_weights, coding=True)
    network, _ = load_weights(tiny_weights)
    assert isinstance(coding, factorized.Model) and isinstance(network, factorized.Codec)
    pixels = smooth_image(72, 90, channels)
    for quality in (1, coding.qualities):
        latents = quantize_tiled(coding, pixels, quality, tile=48)
        assert np.array_equal(latents, quantize_tiled(network, pixels, quality, tile=48))
        mine = reconstruct_tiled(coding, latents, quality, 72, 90, channels == 1, tile=48)
        theirs = reconstruct_tiled(network, latents, quality, 72, 90, channels == 1, tile=48)
        assert mine.shape == theirs.shape == (72, 90, channels)
        assert np.abs(mine.astype(int) - theirs).max() <= 1


def test_effort_two_builds_the_torch_network(tiny_weights):
    coding, _ = load_weights(tiny_weights, coding=True)
    latents = factorized.quantize_latents(coding, smooth_image(32, 32), 2, effort=2)
    assert latents.shape == (coding.config.M, 2, 2)
    assert isinstance(coding.network(), factorized.Codec)


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
from nic.cli import main
sys.argv = ["nic", *sys.argv[1:]]
main()
"""


def test_encode_decode_and_info_run_without_torch(tmp_path):
    """The shipped weights code a file in a process where torch cannot be imported."""
    image = tmp_path / "a.png"
    Image.fromarray(smooth_image(40, 56)).save(image)
    for args in (["encode", str(image), "-o", str(tmp_path / "a.nic"), "-j", "1"],
                 ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "b.png")],
                 ["info", str(tmp_path / "a.nic")],
                 # the factorized family between its qualities, and by size (no step: the quality below)
                 ["encode", str(image), "--model", "factorized", "-q", "3.5", "-o", str(tmp_path / "c.nic")],
                 ["encode", str(image), "--model", "factorized", "--size", "2000", "-o", str(tmp_path / "d.nic")]):
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
    assert Image.open(tmp_path / "b.png").size == (56, 40)


@pytest.mark.parametrize("args", [["encode", "IN", "-e", "2", "-o", "OUT"], ["train", "DATA", "--out", "RUN", "--steps", "1"]])
def test_what_needs_torch_says_how_to_install_it(tmp_path, args):
    image = tmp_path / "a.png"
    Image.fromarray(smooth_image(32, 32)).save(image)
    args = [{"IN": str(image), "OUT": str(tmp_path / "a.nic"), "DATA": str(tmp_path), "RUN": str(tmp_path / "run")}.get(a, a) for a in args]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "pip install 'nic[train]'" in lines[0], lines
    assert not (tmp_path / "a.nic").exists()


def test_the_library_says_what_to_install_for_effort_two_without_torch():
    """nic.encode(effort=2) where torch is missing: a ModuleNotFoundError (name "torch") that
    says what to install; the pixels family's efforts need no torch."""
    probe = """
import sys
sys.modules["torch"] = None
import numpy as np
import nic
image = (np.indices((24, 32)).sum(0) * 5 % 256).astype(np.uint8)
assert nic.encode(image, effort=4, model="pixels")
try:
    nic.encode(image, effort=2)
except ModuleNotFoundError as exc:
    print(exc.name, exc)
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("torch this needs PyTorch") and "pip install 'nic[train]'" in proc.stdout.decode()


def test_the_same_bits_with_any_thread_count(monkeypatch):
    """Chunks are cut by the sizes alone, each one computed by one thread: 1 or 3 threads
    give the same bits (small chunks here, so that there are many)."""
    monkeypatch.setattr(engine, "_CHUNK_ROWS", 16)
    monkeypatch.setattr(engine, "_CHUNK_BYTES", 1024)
    monkeypatch.setattr(engine, "_CHUNK_MOST", 32)
    monkeypatch.setattr(engine, "_BLOCK", 64)
    monkeypatch.setattr(engine, "_SIDE_PIXELS", 64)
    rng = np.random.default_rng(3)
    layers = [engine.Conv(rng.normal(size=(12, 3, 5, 5)).astype(np.float32), rng.normal(size=12), 2),
              engine.GDN(np.ones(12), np.abs(rng.normal(size=(12, 12))) * 0.1, inverse=False),
              engine.Conv(rng.normal(size=(16, 12, 5, 5)).astype(np.float32), rng.normal(size=16), 2),
              engine.Deconv(rng.normal(size=(16, 12, 5, 5)).astype(np.float32), rng.normal(size=12), 2),
              engine.Deconv(rng.normal(size=(12, 3, 5, 5)).astype(np.float32), rng.normal(size=3), 2)]
    x = rng.normal(size=(52, 70, 3)).astype(np.float32)
    results = []
    saved = engine.threads()
    try:
        for count in (1, 3):
            engine.set_threads(count)
            results.append(engine.Network(layers)(x))
    finally:
        engine.set_threads(saved)
    assert results[0].shape == (52, 72, 3)
    assert np.array_equal(results[0], results[1])


def test_blas_runs_one_thread_while_the_engines_threads_do(monkeypatch):
    """Otherwise BLAS's threads and nic's share the cores twice over (2x slower in a
    program that imports nic); the program's own setting comes back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)  # as in a program, not nic's CLI
    engine._blas_libraries.cache_clear()
    seen = []

    def work(item: int) -> None:
        seen.append(max(info["num_threads"] for info in threadpoolctl.threadpool_info()
                        if info["user_api"] == "blas"))

    saved = engine.threads()
    try:
        engine.set_threads(2)
        with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
            engine.parallel(work, 4)
            after = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    finally:
        engine.set_threads(saved)
        engine._blas_libraries.cache_clear()
    assert seen == [1] * 4
    assert after and all(n == 2 for n in after)


def test_set_threads_takes_a_positive_integer():
    from nic import engine

    before = engine.threads()
    for bad, error in ((2.5, TypeError), (True, TypeError), ("2", TypeError), (None, TypeError), (0, ValueError)):
        with pytest.raises(error):
            engine.set_threads(bad)
    assert engine.threads() == before
