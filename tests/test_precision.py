"""nic.precision: choosing fp32 or bf16 for the transforms, and what bf16 may change."""

import sys

import numpy as np
import pytest

from conftest import smooth_image
from nic import api, engine, precision
from nic.tiling import quantize_tiled, reconstruct_tiled
from nic.weights import default_weights, load_weights

BF16 = pytest.mark.skipif(not precision.bf16_units(),
                          reason="this CPU has no bf16 units (AVX-512 BF16 or AMX): bf16 would be emulated")


def test_choose(monkeypatch):
    monkeypatch.setattr(precision, "bf16_units", lambda: True)
    assert precision.choose("fp32", 1 << 30) == "fp32"
    assert precision.choose("bf16", 16) == "bf16"
    assert precision.choose("auto", 10**8) == "bf16"
    monkeypatch.setattr(precision, "bf16_units", lambda: False)
    assert precision.choose("auto", 10**8) == "fp32"
    with pytest.raises(precision.PrecisionError, match="precision must be one of"):
        precision.choose("half", 16)


def test_auto_is_fp32_for_small_images(monkeypatch):
    """Importing torch costs more than bf16 saves on a small image; the rule looks at the
    image and the machine only, so the same call gives the same bytes in any process."""
    monkeypatch.setattr(precision, "bf16_units", lambda: True)
    assert "torch" in sys.modules  # loaded by this test run, and still fp32 below the size
    assert precision.choose("auto", precision.AUTO_PIXELS - 1) == "fp32"
    assert precision.choose("auto", precision.AUTO_PIXELS) == "bf16"


def test_blocked_torch_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert not precision.torch_installed()


def test_bf16_without_torch_is_refused(monkeypatch):
    monkeypatch.setattr(precision, "torch_installed", lambda: False)
    with pytest.raises(precision.PrecisionError, match="needs PyTorch"):
        precision.choose("bf16", 16)
    assert precision.choose("auto", 10**8) == "fp32"


def test_views_share_the_model(tiny_weights):
    model, _ = load_weights(tiny_weights, coding=True)
    view = model.at_precision("bf16")
    assert view.precision == "bf16" and model.precision == "fp32"
    assert model.at_precision("bf16") is view and view.at_precision("fp32") is model
    assert view.tables is model.tables
    with pytest.raises(ValueError):
        model.at_precision("fp16")


@BF16
@pytest.mark.parametrize("fixture", ["tiny_weights", "tiny_hyperprior_weights"])
def test_bf16_bytes_do_not_depend_on_threads(fixture, request):
    weights = request.getfixturevalue(fixture)
    pixels = smooth_image(80, 112, seed=3)
    files, images = [], []
    for threads in (1, 2, 3):
        engine.set_threads(threads)
        try:
            files.append(api.encode_pixels(pixels, 2, weights, precision="bf16"))
            images.append(api.decode_pixels(files[0], weights, precision="bf16").pixels)
        finally:
            engine.set_threads(2)
    assert files[0] == files[1] == files[2]
    assert (images[0] == images[1]).all() and (images[0] == images[2]).all()


@BF16
def test_bf16_is_close_to_fp32(tiny_weights):
    model, _ = load_weights(tiny_weights, coding=True)
    pixels = smooth_image(96, 128, seed=5)
    fp32 = quantize_tiled(model, pixels, 1)
    bf16 = quantize_tiled(model.at_precision("bf16"), pixels, 1)
    assert np.abs(fp32 - bf16).max() <= 1 and (fp32 != bf16).mean() < 0.01  # a few near a half round the other way
    out = {name: reconstruct_tiled(m, fp32, 1, 96, 128, False) for name, m in
           (("fp32", model), ("bf16", model.at_precision("bf16")))}
    difference = np.abs(out["fp32"].astype(int) - out["bf16"])
    assert difference.max() <= 2 and difference.mean() < 0.05


@BF16
def test_every_precision_decodes_every_file(tiny_hyperprior_weights):
    """The entropy decoding never depends on the precision: the same integers either way."""
    pixels = smooth_image(64, 96, seed=7)
    for written in ("fp32", "bf16"):
        data = api.encode_pixels(pixels, 2, tiny_hyperprior_weights, precision=written)
        latents = [api.decode_pixels(data, tiny_hyperprior_weights, precision=read).latents for read in ("fp32", "bf16")]
        np.testing.assert_array_equal(latents[0], latents[1])


@BF16
def test_exact_output_layer_matches_float64():
    """g_s's last layer in bf16 gives the pixels of its bf16 inputs and weights to fp32's accuracy."""
    import torch

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(24, 3, 5, 5)).astype(np.float32) * 0.1
    bias = rng.normal(size=3).astype(np.float32)
    layer = engine.Deconv(weight, bias, 2)
    x = rng.random((9, 13, 24)).astype(np.float32)
    got = precision._ExactOutput(torch, layer, None)(torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0))
    rounded = torch.from_numpy(x).to(torch.bfloat16).double().permute(2, 0, 1).unsqueeze(0)
    expected = torch.nn.functional.conv_transpose2d(rounded, torch.from_numpy(weight).to(torch.bfloat16).double(),
                                                    torch.from_numpy(bias).double(), 2, 2, 1)
    np.testing.assert_allclose(got, expected[0].permute(1, 2, 0).numpy(), atol=3e-5)  # bf16 alone: ~1e-2


def test_keep_freed_memory_says_whether_it_took():
    assert precision.keep_freed_memory() in (True, False)


@BF16
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_transforms_are_right_at_every_tile_shape(threads):
    """bf16 g_a and g_s of the installed weights (the layer shapes that run) against fp32
    on blocks from 16 to 176 pixels a side (torch's bf16 convolutions have been wrong on
    narrow inputs: nic.precision.NARROW)."""
    model, _ = default_weights(None, "factorized", coding=True)
    fast = model.at_precision("bf16")
    engine.set_threads(threads)
    try:
        for height in range(16, 177, 32):
            for width in (16, 32, 48, 64, 176):
                for h, w in ((height, width), (width, height)):
                    block = smooth_image(h, w, seed=h * w)
                    y = model.analysis_array(block, 1)
                    assert np.abs(fast.analysis_array(block, 1) - y).max() < 0.05 * (1 + np.abs(y).max()), (h, w)
                    x = model.synthesis_array(np.round(y), 1)
                    assert np.abs(fast.synthesis_array(np.round(y), 1) - x).max() < 0.02, (h, w)
    finally:
        engine.set_threads(2)


def test_cli_says_which_precision_ran(tmp_path, tiny_weights, monkeypatch):
    from PIL import Image
    from click.testing import CliRunner

    from nic.cli import cli

    Image.fromarray(smooth_image(32, 48)).save(tmp_path / "a.png")
    runner = CliRunner()
    result = runner.invoke(cli, ["encode", str(tmp_path / "a.png"), "--weights", tiny_weights, "--precision", "fp32",
                                 "-v", "-o", str(tmp_path / "a.nic")])
    assert result.exit_code == 0 and "fp32" in result.output
    result = runner.invoke(cli, ["decode", str(tmp_path / "a.nic"), "--weights", tiny_weights, "-v",
                                 "--precision", "fp32", "-o", str(tmp_path / "b.png")])
    assert result.exit_code == 0 and "fp32" in result.output
    monkeypatch.setattr(precision, "torch_installed", lambda: False)
    result = runner.invoke(cli, ["encode", str(tmp_path / "a.png"), "--weights", tiny_weights, "--precision", "bf16",
                                 "-o", str(tmp_path / "c.nic")])
    assert result.exit_code == 1 and "needs PyTorch" in result.output and not (tmp_path / "c.nic").exists()


def test_pillow_plugin_takes_a_precision():
    import io

    from PIL import Image

    import nic  # noqa: F401  (registers the plugin)

    pixels = smooth_image(32, 48)
    saved = io.BytesIO()
    Image.fromarray(pixels).save(saved, "NIC", quality=1, precision="fp32", model="factorized")
    assert saved.getvalue() == api.encode_pixels(pixels, 1, family="factorized", precision="fp32")
    opened = Image.open(io.BytesIO(saved.getvalue()))
    opened.precision = "fp32"
    np.testing.assert_array_equal(np.asarray(opened), api.decode_pixels(saved.getvalue(), precision="fp32").pixels)


def test_the_top_level_api_takes_a_precision():
    """nic.encode and nic.decode take ``precision`` as the README shows, and pass it on."""
    import nic

    pixels = smooth_image(32, 48)
    data = nic.encode(pixels, quality=1, model="factorized", precision="fp32")
    assert data == api.encode_pixels(pixels, 1, family="factorized", precision="fp32")
    np.testing.assert_array_equal(np.asarray(nic.decode(data, precision="fp32")),
                                  api.decode_pixels(data, precision="fp32").pixels)
    for call in (lambda: nic.encode(pixels, precision="half"), lambda: nic.decode(data, precision="half")):
        with pytest.raises(precision.PrecisionError, match="precision must be one of"):
            call()
