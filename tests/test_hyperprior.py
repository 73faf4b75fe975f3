"""The mean-scale hyperprior family (nic.hyperprior): its files, its integer hyper-decoder
and its determinism, on a tiny random model (conftest.tiny_hyperprior)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import smooth_image, tiny_context_model, tiny_hyperprior
from nic import api, container, hyperprior, weights
from nic.container import FormatError, Header, Substream
from nic.weights import WeightsError, load_weights, save_weights


@pytest.fixture(scope="module")
def model():
    return tiny_hyperprior()


def test_round_trip_through_the_api_writes_substreams(tiny_hyperprior_weights):
    image = smooth_image(100, 130)
    data = api.encode_pixels(image, 3, tiny_hyperprior_weights)
    parsed = container.unpack(data)
    assert parsed.header.version == 2 and parsed.header.model_id == hyperprior.MODEL_ID
    assert [(s.name, s.shape) for s in parsed.substreams()] == [(b"zhat", (8, 2, 3)), (b"yhat", (16, 7, 9))]
    decoded = api.decode_pixels(data, tiny_hyperprior_weights)
    assert decoded.pixels.shape == image.shape and decoded.latents.shape == (16, 7, 9)
    gray = api.decode_pixels(api.encode_pixels(image[..., :1], 3, tiny_hyperprior_weights), tiny_hyperprior_weights)
    assert gray.pixels.shape == (100, 130, 1)


def test_decoding_adds_the_means_back(model):
    """ŷ = round(y − μ) + μ: the decoder's latents are the residuals plus the integer h_s's means."""
    image = smooth_image(64, 80)
    substreams = hyperprior.compress(model, image, 3)
    y = hyperprior.analysis(model, image, 3)
    z_hat = model.hyper_encode(y, 3)
    mean, _ = model.hyper_decode(z_hat, 3, *y.shape[1:])
    seen = []
    rows = []
    hyperprior.decompress(model, 3, 64, 80, False, substreams, rows.append, on_latents=lambda s: seen.append(s.array))
    np.testing.assert_array_equal(seen[0], np.round(y.astype(np.float64) - mean))
    assert np.abs(seen[0] + mean - y).max() <= 0.5 + 1e-6
    assert np.concatenate(rows).shape == (64, 80, 3)


def test_integer_hyper_decoder_follows_the_float_one(model):
    """Calibrated, the integer h_s gives the float h_s's means to within a few 1/256 and
    the same rounded scale index almost everywhere."""
    y = hyperprior.analysis(model, smooth_image(128, 160), 3)
    model.export_tables([torch.from_numpy(y)[None]] * model.qualities)
    try:
        z_hat = model.hyper_encode(y, 3)
        mean, index = model.hyper_decode(z_hat, 3, *y.shape[1:])
        with torch.no_grad():
            out = model.hyper[2].h_s(torch.from_numpy(z_hat).float()[None])[0, :, : y.shape[1], : y.shape[2]]
        float_mean, float_index = out[:16].double().numpy(), out[16:].numpy()
        assert np.abs(mean - float_mean).max() < 0.05
        expected = np.clip(np.round(float_index), 0, 63)
        assert (index == expected).mean() > 0.99 and np.abs(index - expected).max() <= 1
        assert mean.dtype == np.float64 and np.array_equal(mean * 256, np.round(mean * 256))
    finally:
        model.export_tables()


def test_hyper_decoder_ignores_perturbations_below_a_step(model):
    """What picks a table or a mean depends on ẑ alone: g_a's output moved far below a
    quantization step gives the same ẑ, so the same means and indices."""
    y = hyperprior.analysis(model, smooth_image(96, 96), 3)
    z_hat = model.hyper_encode(y, 3)
    nudged = model.hyper_encode(y + 1e-5 * np.random.default_rng(0).standard_normal(y.shape, np.float32), 3)
    assert np.array_equal(z_hat, nudged)
    first = model.hyper_decode(z_hat, 3, 6, 6)
    second = model.hyper_decode(nudged.copy(), 3, 6, 6)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_numpy_model_codes_as_the_torch_network_does(tiny_hyperprior_weights):
    """The coder's model (numpy g_a and h_a, integer h_s) and the torch Codec of the same
    weights write the same substreams, and decode to pixels at most one level apart."""
    coding, _ = load_weights(tiny_hyperprior_weights, coding=True)
    network, _ = load_weights(tiny_hyperprior_weights)
    assert isinstance(coding, hyperprior.Model) and isinstance(network, hyperprior.Codec)
    image = smooth_image(72, 90)
    for quality in (1, 3):
        substreams = hyperprior.compress(coding, image, quality)
        assert [s.data for s in substreams] == [s.data for s in hyperprior.compress(network, image, quality)]
        decoded = []
        for model in (coding, network):
            rows = []
            hyperprior.decompress(model, quality, 72, 90, False, substreams, rows.append)
            decoded.append(np.concatenate(rows).astype(int))
        assert np.abs(decoded[0] - decoded[1]).max() <= 1


def test_effort_two_searches_the_residuals_and_decodes(model):
    """Effort 2 picks the residuals by D + λR under each latent's own table, with ẑ (so μ
    and the scale indices) fixed: the file decodes, and its cost J is not higher."""
    image = smooth_image(64, 80)
    costs = []
    for effort in (1, 2):
        substreams = hyperprior.compress(model, image, 3, effort=effort)
        rows = []
        hyperprior.decompress(model, 3, 64, 80, False, substreams, rows.append)
        decoded = np.concatenate(rows).astype(np.float64)
        bits = 8 * sum(len(s.data) for s in substreams)
        mse = np.mean((decoded - image) ** 2) / 255.0**2
        costs.append(bits + model.base.config.lambdas[2] * 255.0**2 * mse * image[..., 0].size)
    assert costs[1] <= costs[0] + 64  # the byte-rounding of two substreams


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
from nic.cli import main
sys.argv = ["nic", *sys.argv[1:]]
main()
"""


def test_files_code_without_torch(tiny_hyperprior_weights, tmp_path):
    from PIL import Image

    Image.fromarray(smooth_image(40, 56)).save(tmp_path / "a.png")
    weights = ["--weights", tiny_hyperprior_weights]
    for args in (["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "a.nic"), "--model", "hyperprior", *weights],
                 ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "b.png"), *weights]):
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
    assert Image.open(tmp_path / "b.png").size == (56, 40)


DIGEST_PROBE = """
import hashlib, sys
import numpy as np
import torch
sys.path.insert(0, "tests")
from conftest import smooth_image
from nic import api
torch.set_num_threads(int(sys.argv[2]))
torch.backends.mkldnn.enabled = sys.argv[3] == "on"
data = api.encode_pixels(smooth_image(80, 112, seed=5), 3, sys.argv[1])
decoded = api.decode_pixels(data, sys.argv[1])
print(hashlib.sha256(data).hexdigest(), hashlib.sha256(decoded.pixels.tobytes()).hexdigest())
"""


@pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
def test_same_bytes_with_one_or_two_threads_and_onednn_on_or_off(context, tiny_hyperprior_weights,
                                                                  tiny_context_weights):
    """The bitstream of a file, and the means and indices behind it, do not depend on the
    thread count of torch or of the BLAS that runs the integer h_s and the integer context
    networks (nic.context), nor on oneDNN."""
    weights = tiny_context_weights if context else tiny_hyperprior_weights
    results = set()
    streams = set()
    for threads, onednn in ((1, "on"), (2, "on"), (2, "off")):
        env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, "-c", DIGEST_PROBE, weights, str(threads), onednn],
                              capture_output=True, text=True, timeout=300, env={**__import__("os").environ, **env})
        assert proc.returncode == 0, proc.stderr
        file_digest, _ = proc.stdout.split()
        results.add(file_digest)
        streams.add(proc.stdout)
    assert len(results) == 1


def test_weights_round_trip_and_refuse_out_of_range_integer_layers(model, tmp_path):
    arrays = hyperprior.to_arrays(model, half=True)
    path = tmp_path / "h.npz"
    save_weights(arrays, path)
    loaded, _ = load_weights(path)
    assert isinstance(loaded, hyperprior.Codec)
    coding, _ = load_weights(path, coding=True)
    assert isinstance(coding, hyperprior.Model)
    image = smooth_image(48, 64)
    assert [s.data for s in hyperprior.compress(loaded, image, 2)] == \
        [s.data for s in hyperprior.compress(load_weights(path)[0], image, 2)]
    for name, value in (("integer_h_s.0.1.shift", 41), ("integer_h_s.0.2.bias", 2**41)):
        broken = dict(arrays)
        broken[name] = np.full_like(arrays[name], value)
        save_weights(broken, tmp_path / "bad.npz")
        with pytest.raises(WeightsError, match="out of range"):
            load_weights(tmp_path / "bad.npz")
    coding, _ = load_weights(tmp_path / "bad.npz", coding=True)  # checks a quality's h_s when it is used
    with pytest.raises(ValueError, match="out of range"):
        coding.hyper_decode(np.zeros((8, 1, 1), np.int64), 1, 2, 2)
    missing = {k: v for k, v in arrays.items() if k != "hyper.1.h_s.2.weight"}
    save_weights(missing, tmp_path / "missing.npz")
    with pytest.raises(WeightsError, match="lack tensor hyper.1.h_s.2.weight"):
        load_weights(tmp_path / "missing.npz")


def _rewrite(data: bytes, substreams: list[Substream], **fields) -> bytes:
    """The file with another payload (CRCs recomputed), as a hostile writer would make it."""
    parsed = container.unpack(data)
    payload = b"".join(bytes(p) for p in container.pack_substreams(substreams))
    header = Header(**{**parsed.header.__dict__, "payload_length": len(payload), **fields})
    return container.pack(header, payload)


@pytest.fixture(scope="module")
def hyper_file(tiny_hyperprior_weights) -> bytes:
    return api.encode_pixels(smooth_image(100, 130), 3, tiny_hyperprior_weights)


def test_hostile_substreams_fail_with_one_message(hyper_file, tiny_hyperprior_weights):
    z, y = container.unpack(hyper_file).substreams()
    cases = {
        "substream zhat has shape 8x1x3, expected 8x2x3": [Substream(z.name, (8, 1, 3), z.data), y],
        "needs zhat, yhat": [y],
        "substreams yhat, zhat": [y, z],
        "substream yhat is corrupt": [z, Substream(y.name, y.shape, y.data[: len(y.data) // 8 * 4])],
        "substream zhat is corrupt": [Substream(z.name, z.shape, z.data[:4]), y],
    }
    for message, substreams in cases.items():
        with pytest.raises(FormatError, match=message):
            api.decode_pixels(_rewrite(hyper_file, substreams), tiny_hyperprior_weights)
    # A factorized-style (version 1) payload under the hyperprior's model id.
    parsed = container.unpack(hyper_file)
    v1 = container.pack(Header(**{**parsed.header.__dict__, "version": 1, "payload_length": len(y.data)}), y.data)
    with pytest.raises(FormatError, match="hyperprior family must be format version 2, not 1"):
        api.decode_pixels(v1, tiny_hyperprior_weights)


def test_training_bits_reach_every_part(model):
    model.train()
    try:
        y = torch.randn(2, 16, 8, 8) * 4
        z_bits, y_bits, y_hat = model.latent_bits(y, 3)
        (z_bits + y_bits).sum().backward()
        assert torch.isfinite(z_bits).all() and torch.isfinite(y_bits).all()
        assert (y_hat - y).abs().max() <= 0.5 + 1e-5
        for name, part in (("h_a", model.hyper[2].h_a), ("h_s", model.hyper[2].h_s), ("z density", model.z_density)):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
        assert all(p.grad is None for p in model.hyper[0].parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_the_rounded_training_rate_is_what_the_coder_spends(model):
    """With ``rounded``, training sees ŷ's rate and ŷ exactly as evaluation (the coder)
    does: h_s gets round(z), not z plus noise; its gradient still reaches h_a."""
    y = torch.randn(2, 16, 8, 8) * 4
    with torch.no_grad():
        _, coded_bits, coded_y_hat = model.latent_bits(y, 3, rounded=True)
    model.train()
    try:
        _, y_bits, y_hat = model.latent_bits(y, 3, rounded=True)
        assert torch.allclose(y_bits, coded_bits) and torch.equal(y_hat, coded_y_hat)
        y_bits.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.hyper[2].h_a.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_start_from_fits_a_gaussian_per_channel():
    """A fresh h_s starts as exactly a per-channel Gaussian: each channel's mean and the
    scale index of its spread, whatever z is."""
    model = tiny_hyperprior()
    y = torch.randn(4, 16, 6, 6) * torch.linspace(0.05, 20, 16).reshape(1, -1, 1, 1) + 3.0
    model.start_from(y, 2)
    assert not model.hyper[1].h_s[-1].weight.any()
    bias = model.hyper[1].h_s[-1].bias.detach()
    torch.testing.assert_close(bias[:16], y.mean(dim=(0, 2, 3)))
    sigma = model.conditional.scale(bias[16:])
    spread = y.std(dim=(0, 2, 3), unbiased=False).clamp_min(model.conditional.minimum)
    assert torch.all((sigma / spread - 1).abs() < 0.07)  # within half a step of the scale table


def test_cli_reports_a_lying_substream_in_one_line(hyper_file, tiny_hyperprior_weights, tmp_path):
    from click.testing import CliRunner

    from nic.cli import cli

    z, y = container.unpack(hyper_file).substreams()
    lying = tmp_path / "lying.nic"
    lying.write_bytes(_rewrite(hyper_file, [Substream(z.name, (8, 2, 2), z.data), y]))
    result = CliRunner().invoke(cli, ["decode", str(lying), "--weights", tiny_hyperprior_weights,
                                      "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"nic: error: {lying}: substream zhat has shape 8x2x2, expected 8x2x3"]
    assert not (tmp_path / "out.png").exists()


def test_a_quality_state_moves_between_models():
    source, target = tiny_hyperprior(seed=1), tiny_hyperprior(seed=2)
    target.load_quality_state(2, source.quality_state(2))
    y = torch.randn(1, 16, 8, 8)
    torch.manual_seed(0)
    expected = source.latent_bits(y, 2)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(expected, target.latent_bits(y, 2)))
    torch.manual_seed(0)
    assert not torch.equal(expected[0], target.latent_bits(y, 1)[0])  # quality 1 kept its own


def test_training_tool_trains_every_quality_and_exports_weights(tmp_path, photos, tiny_weights):
    """tools/train_hyperprior.py end to end on a tiny model: cache, train, resume, export."""
    tool = [sys.executable, "tools/train_hyperprior.py", str(photos), "--init", tiny_weights,
            "--out", str(tmp_path / "run"), "--crops", "8", "--patch", "64", "--steps", "2", "--batch", "2",
            "--hyper-N", "8", "--Z", "4"]
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    first = subprocess.run([*tool, "--qualities", "1-3", "--holdout", "2"], capture_output=True, text=True,
                           timeout=600, cwd=root)
    assert first.returncode == 0, first.stderr
    assert "held out:" in first.stdout
    early = subprocess.run([*tool, "--qualities", "1", "--export", str(tmp_path / "h.npz")], capture_output=True,
                           text=True, timeout=600, cwd=root)
    assert early.returncode != 0 and "qualities 4, 5, 6, 7, 8 are not trained yet" in early.stderr
    done = subprocess.run([*tool, "--export", str(tmp_path / "h.npz")], capture_output=True, text=True,
                          timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr
    data = api.encode_pixels(smooth_image(40, 56), 5, str(tmp_path / "h.npz"))
    assert api.decode_pixels(data, str(tmp_path / "h.npz")).pixels.shape == (40, 56, 3)
    # Context networks on top of that run's qualities (nic.context), then exported.
    context = [*tool[:6], str(tmp_path / "context"), *tool[7:], "--context-from", str(tmp_path / "run"),
               "--slices", "2", "--checkerboard", "--context-width", "8", "--context-kernel", "3"]
    trained = subprocess.run([*context, "--holdout", "2", "--export", str(tmp_path / "c.npz")], capture_output=True,
                             text=True, timeout=600, cwd=root)
    assert trained.returncode == 0, trained.stderr
    assert "q8 context step 2 held out:" in trained.stdout
    data = api.encode_pixels(smooth_image(40, 56), 5, str(tmp_path / "c.npz"))
    assert api.decode_pixels(data, str(tmp_path / "c.npz")).pixels.shape == (40, 56, 3)
    # Quality 2 end to end (tools/joint_hyperprior.py), then exported with the others.
    joint = subprocess.run([sys.executable, "tools/joint_hyperprior.py", str(photos), "--run", str(tmp_path / "run"),
                            "-q", "2", "--init", tiny_weights, "--steps", "2", "--batch", "2", "--patch", "64",
                            "--holdout", "1"], capture_output=True, text=True, timeout=600, cwd=root)
    assert joint.returncode == 0, joint.stderr
    assert "q2 step 2 " in joint.stdout and (tmp_path / "run" / "q2-joint.pt").exists()
    again = subprocess.run([*tool, "--export", str(tmp_path / "j.npz")], capture_output=True, text=True,
                           timeout=600, cwd=root)
    assert again.returncode == 0, again.stderr
    exported, _ = load_weights(tmp_path / "j.npz")
    assert 2 in exported.base.config.specialized
    data = api.encode_pixels(smooth_image(40, 56), 2, str(tmp_path / "j.npz"))
    assert api.decode_pixels(data, str(tmp_path / "j.npz")).pixels.shape == (40, 56, 3)


def test_shipped_form_shares_the_transforms_and_codes_as_the_full_weights(tmp_path):
    """Coding-only weights (the form nic ships): no float h_s or context networks, h_a's
    kernels int8, the transforms named by hash and read from the factorized weights
    beside them. The decoder computes exactly what the full weights' does; training
    from them is refused; without their transforms installed they fail in one line."""
    from nic import factorized
    from nic.context import put_network

    model = tiny_hyperprior(slices=2, checkerboard=True, context_width=8, context_kernel=3)
    save_weights(hyperprior.to_arrays(model), tmp_path / "full.npz")
    ship = tmp_path / "ship"
    ship.mkdir()
    base_digest = save_weights(factorized.to_arrays(model.base), ship / "base.npz")
    arrays = hyperprior.to_arrays(model, separate_base=True, coding_only=True)
    assert not any(name.startswith(("base.", "context.")) or ".h_s." in name for name in arrays)
    assert arrays["hyper.0.h_a.0.weight"].dtype == np.int8
    assert hyperprior.read_config(arrays).base == base_digest.hex()
    save_weights(arrays, ship / "hyperprior.npz")

    image = smooth_image(72, 90)
    for quality in (2, 3):
        data = api.encode_pixels(image, quality, ship / "hyperprior.npz")
        coded = container.unpack(data).substreams()
        ours, _ = load_weights(ship / "hyperprior.npz", coding=True)
        full, _ = load_weights(tmp_path / "full.npz", coding=True)
        decoded = []
        for each in (ours, full):
            rows = []
            hyperprior.decompress(each, quality, 72, 90, False, coded, rows.append)
            decoded.append(np.concatenate(rows))
        assert np.array_equal(decoded[0], decoded[1])
        assert np.array_equal(api.decode_pixels(data, ship / "hyperprior.npz").pixels, decoded[0])

    trainable, _ = load_weights(ship / "hyperprior.npz")
    with pytest.raises(ValueError, match="for coding only"):
        trainable.latent_bits(torch.zeros(1, 16, 4, 4), 3)
    with pytest.raises(ValueError, match="cannot be exported again"):
        hyperprior.to_arrays(trainable)

    (ship / "base.npz").unlink()
    (ship / "base.npz.digest").unlink()
    weights._load_path.cache_clear()  # loaded models are cached per process
    with pytest.raises(WeightsError, match=f"share the transforms of weights {base_digest.hex()}"):
        load_weights(ship / "hyperprior.npz", coding=True)

    forged = dict(arrays, config=np.frombuffer(bytes(arrays["config"]).replace(base_digest.hex().encode(),
                                                                              b"not-a-hash"), np.uint8))
    save_weights(forged, ship / "forged.npz")
    with pytest.raises(WeightsError, match="invalid base 'not-a-hash'"):
        load_weights(ship / "forged.npz", coding=True)

    # Context weights that fit 8 bits are stored in 8 (export_tables(context_weight_max=127)).
    model.export_tables(context_weight_max=127)
    narrow: dict = {}
    put_network(narrow, "n", model.integer_context[2]["1_1"], narrow=True)
    assert narrow["n.first_context"].dtype == np.int8 and np.abs(narrow["n.first_context"]).max() <= 127


def test_a_quality_between_two_trained_ones_codes_with_a_coarser_step(tmp_path):
    """-q 2.5 codes with quality 3's networks and a coarser step (a critical STEP section):
    its file lies between quality 2's and 3's in size and decodes to what its integers say
    (ŷ = μ + k·Δ). A factorized file with a
    STEP section, or a hyperprior file at effort 2 with a step, is refused in one line."""
    model = tiny_context_model()
    path = tmp_path / "w.npz"
    save_weights(hyperprior.to_arrays(model), path)
    image = smooth_image(64, 96, seed=3)
    files = {q: api.encode_pixels(image, q, path) for q in (2, 2.5, 3)}
    assert len(files[2]) < len(files[2.5]) < len(files[3])
    parsed = container.unpack(files[2.5])
    assert parsed.header.quality == 3
    size, shift = container.unpack_step(dict(parsed.sections)[container.SECTION_STEP])
    digest = container.unpack(files[2.5]).header.weights_hash  # a tiny model's: no spans of its own
    assert (3, (size, shift)) == hyperprior.step_for(2.5, digest) and size > 256 and shift > 0
    assert container.SECTION_STEP not in dict(container.unpack(files[3]).sections)
    decoded = api.decode_pixels(files[2.5], path)
    assert decoded.pixels.shape == image.shape
    coding, _ = load_weights(path, coding=True)
    seen = []
    hyperprior.decompress(coding, 3, 64, 96, False, parsed.substreams(), lambda rows: None,
                          on_latents=lambda store: seen.append(store.rows(0, 4)), step=(size, shift))
    assert np.array_equal(seen[0], decoded.latents)
    with pytest.raises(ValueError, match="effort 1"):
        api.encode_pixels(image, 2.5, path, effort=2)



    factorized_file = container.unpack(api.encode_pixels(image, 2, family="factorized"))
    forged = container.pack(factorized_file.header, factorized_file.payload,
                            [(container.SECTION_STEP, container.pack_step(300, 1))])
    with pytest.raises(FormatError, match="STEP is not part of the factorized family"):
        api.decode_pixels(forged)


def test_the_shipped_weights_have_a_span_for_each_interval():
    """A quality between two trained ones takes the measured span of its interval for the
    shipped weights (nic.hyperprior.STEP_SPANS: Δ = 2**(span·(n − q))), and STEP_SPAN for
    weights without a table."""
    model, digest = weights.default_weights(family="hyperprior", coding=True)
    spans = hyperprior.STEP_SPANS[digest.hex()]
    assert len(spans) == model.qualities - 1
    for n, span in zip(range(2, model.qualities + 1), spans):
        coded, (size, _) = hyperprior.step_for(n - 0.5, digest)
        assert coded == n and size == round(256 * 2 ** (span * 0.5))
    assert hyperprior.step_for(1.5, bytes(8))[1][0] == round(256 * 2 ** (hyperprior.STEP_SPAN * 0.5))


@pytest.mark.parametrize("quality, channels", [(3, 3), (2.5, 3), (3, 1)])
def test_the_y_hat_the_encoder_hands_back_synthesizes_to_the_decoded_pixels(tmp_path, quality, channels):
    """The default's later tries (nic.api) synthesize the model's file from ŷ instead of
    decoding it: that must be the decoder's output, with context and with a step."""
    path = tmp_path / "w.npz"
    save_weights(hyperprior.to_arrays(tiny_context_model()), path)
    image = smooth_image(70, 100, channels, seed=5)
    coding, digest = load_weights(path, coding=True)
    model, _, coded, step = api._model(path, None, quality)
    handed = []
    substreams = hyperprior.compress(coding, image, coded, step=step or container.UNIT_STEP, on_y_hat=handed.append)
    data = b"".join(api._file_parts(coding, digest, coded, channels, 100, 70, substreams, None, None, False, step))
    rows: list[np.ndarray] = []
    api._synthesized(coding, handed[0], coded, image)(rows.append)
    assert np.array_equal(np.concatenate(rows), api.decode_pixels(data, path).pixels)


def test_shipped_weights_become_trainable_again(tmp_path):
    """Coding-only weights read back into float networks (hyperprior.trainable_again) give
    the same means and scale indices as the integer networks they came from, up to the
    rounding of activations; re-integerizing one quality (export_quality) leaves every
    other quality's integers as shipped. The loaded model itself stays coding-only."""
    from nic import factorized

    model = tiny_hyperprior(slices=2, checkerboard=True, context_width=8, context_kernel=3)
    save_weights(factorized.to_arrays(model.base), tmp_path / "base.npz")
    save_weights(hyperprior.to_arrays(model, separate_base=True, coding_only=True), tmp_path / "ship.npz")
    shipped, _ = load_weights(tmp_path / "ship.npz")
    again = hyperprior.trainable_again(shipped)
    assert shipped.config.coding_only and not again.config.coding_only

    image = smooth_image(64, 96)
    y = torch.from_numpy(hyperprior.analysis(shipped, image, 3))[None]
    with torch.no_grad():
        z_hat = torch.round(again.hyper[2].h_a(y))
        mean, index = shipped.hyper_decode(z_hat[0].numpy().astype(np.int64), 3, *y.shape[-2:])
        float_mean, float_index = again.means_and_indices(again.hyper[2].h_s(z_hat), y.shape[-2:])
    assert np.abs(float_mean[0].numpy() - mean).max() < 0.05
    rms = [float(layer.weight.detach().pow(2).mean().sqrt()) for layer in again.hyper[2].h_s if hasattr(layer, "weight")]
    assert max(rms) < 1.5 * min(rms)  # balanced: read back from integers, they spanned orders of magnitude
    assert np.mean(np.round(float_index[0].numpy()).clip(0, again.config.scales - 1) != index) < 0.05
    # The context networks read back too: the float passes give the coder's ŷ (the
    # integer passes') but where a mean's rounding moves a residual across a half.
    from nic import context
    y_np = y[0].numpy().astype(np.float64)
    c = y_np.shape[0] // 2

    def residuals(s, where, mu, t):
        return np.round(y_np[s * c:(s + 1) * c][:, where] - mu).astype(np.int64)

    coded_y_hat, _ = context.run_passes(shipped.context_networks(3), mean, index, 2, True,
                                        shipped.config.scales, residuals)
    with torch.no_grad():
        shipped_bits, float_y_hat = again.latent_bits(y, 3, rounded=True)[1:]
    differ = np.abs(float_y_hat[0].numpy() - coded_y_hat) > 0.5
    assert differ.mean() < 0.02
    assert np.abs(float_y_hat[0].numpy() - coded_y_hat)[~differ].max() < 0.05
    with torch.no_grad():
        again.context[2].nets["1_1"].out.bias.zero_()
        assert again.latent_bits(y, 3, rounded=True)[1] != shipped_bits  # the context networks came back too

    kept = [layer.weight.copy() for layer in again.integer_h_s[1].layers]
    again.export_quality(3, y, context_weight_max=127)
    assert all(np.array_equal(a, layer.weight) for a, layer in zip(kept, again.integer_h_s[1].layers))
    assert not np.array_equal(again.integer_context[2]["1_1"].biases[2], shipped.integer_context[2]["1_1"].biases[2])
