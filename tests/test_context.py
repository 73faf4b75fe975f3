"""Context for the hyperprior family (nic.context): channel slices and a checkerboard,
decoded in passes by exact integer networks, on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import smooth_image, tiny_context_model
from nic import api, container, context, hyperprior
from nic.container import FormatError, Substream
from nic.weights import WeightsError, load_weights, save_weights


@pytest.fixture(scope="module")
def weights(tiny_context_weights) -> str:
    return tiny_context_weights


def test_passes_cover_every_latent_once():
    for slices, checkerboard in ((1, True), (4, False), (2, True)):
        seen = np.zeros((16, 5, 7), dtype=int)
        c = 16 // slices
        for s, p in context.passes(slices, checkerboard):
            seen[s * c:(s + 1) * c] += context.phase_mask(5, 7, p, checkerboard)
        assert (seen == 1).all()
    assert context.passes(2, True) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not context.has_network(0, 0) and context.has_network(0, 1)


def test_round_trip_decodes_what_the_encoder_coded(weights):
    image = smooth_image(100, 130)
    data = api.encode_pixels(image, 3, weights)
    assert [(s.name, s.shape) for s in container.unpack(data).substreams()] == \
        [(b"zhat", (8, 2, 3)), (b"yhat", (16, 7, 9))]
    model, _ = load_weights(weights, coding=True)
    y = hyperprior.analysis(model, image, 3)
    seen = []
    hyperprior.decompress(model, 3, 100, 130, False, container.unpack(data).substreams(), lambda rows: None,
                          on_latents=lambda store: seen.append(store.array))
    z_hat = model.hyper_encode(y, 3)
    mean, index = model.hyper_decode(z_hat, 3, *y.shape[1:])
    y_hat, _ = context.run_passes(model.context_networks(3), mean, index, 2, True, 64,
                                  lambda s, where, mu, t: np.round(y[s * 8:(s + 1) * 8, where] - mu))
    assert np.abs(y_hat - y).max() <= 0.5 + 1e-6  # each latent within ½ of g_a's, under its own pass's μ
    assert not np.array_equal(seen[0], np.round(y - mean))  # the passes moved the means
    assert api.decode_pixels(data, weights).pixels.shape == image.shape


def test_integer_context_follows_the_float_one():
    """The integer networks give the float networks' ŷ to within a few 1/256 almost everywhere."""
    model = tiny_context_model()
    coding = hyperprior.Model(hyperprior.to_arrays(model))
    y = hyperprior.analysis(coding, smooth_image(96, 128), 3)
    z_hat = coding.hyper_encode(y, 3)
    mean, index = coding.hyper_decode(z_hat, 3, *y.shape[1:])
    y_hat, _ = context.run_passes(coding.context_networks(3), mean, index, 2, True, 64,
                                  lambda s, where, mu, t: np.round(y[s * 8:(s + 1) * 8, where] - mu))
    with torch.no_grad():
        hyper = model.hyper[2]
        float_mean, float_index = model.means_and_indices(hyper.h_s(torch.from_numpy(z_hat).float()[None]),
                                                          y.shape[1:])
        _, float_y_hat = model.context[2].bits(model.conditional, torch.from_numpy(y)[None], float_mean,
                                               float_index, rounded=True)
    difference = np.abs(y_hat - float_y_hat[0].double().numpy())
    assert (difference < 0.05).mean() > 0.97 and difference.max() <= 1.05


def test_second_phase_skips_only_zeros():
    """In a checkerboard's second phase the pass's own slice is decoded at the anchors
    only: leaving its other taps out of the products (``anchored``) gives the same
    integers as multiplying their zeros."""
    coding = hyperprior.Model(hyperprior.to_arrays(tiny_context_model()))
    network = coding.context_networks(3)["1_1"]
    rng = np.random.default_rng(5)
    rows, cols, M, halo = 7, 9, 16, 1
    hyper = np.concatenate([rng.integers(-2048, 2048, (M, rows * cols)) / 256.0,
                            rng.integers(0, 64, (M, rows * cols)).astype(np.float64)])
    seen = np.zeros((rows + 2 * halo, cols + 2 * halo, M), dtype=np.float32)
    seen[halo:-halo, halo:-halo, :8] = rng.integers(-2048, 2048, (rows, cols, 8)) / 256.0
    anchors = context.phase_mask(rows, cols, 0, True)
    seen[halo:-halo, halo:-halo, 8:][anchors] = rng.integers(-2048, 2048, (int(anchors.sum()), 8)) / 256.0
    where = context.phase_mask(rows, cols, 1, True)
    np.testing.assert_array_equal(network(hyper, seen, halo, 16, where, anchored=8),
                                  network(hyper, seen, halo, 16, where))


def test_a_fresh_context_codes_as_h_s_alone():
    """Zero last layers: every pass's (μ, t) is h_s's, so the coded integers are the plain family's."""
    model = tiny_context_model()
    with torch.no_grad():
        for net in model.context[2].nets.values():
            net.out.weight.zero_()
            net.out.bias.zero_()
    model.export_tables()
    coding = hyperprior.Model(hyperprior.to_arrays(model))
    image = smooth_image(64, 80)
    y = hyperprior.analysis(coding, image, 3)
    mean, _ = coding.hyper_decode(coding.hyper_encode(y, 3), 3, *y.shape[1:])
    seen = []
    hyperprior.decompress(coding, 3, 64, 80, False, hyperprior.compress(coding, image, 3), lambda rows: None,
                          on_latents=lambda store: seen.append(store.array))
    np.testing.assert_array_equal(seen[0], np.round(y.astype(np.float64) - mean))


def test_weights_refuse_context_networks_out_of_range(tmp_path):
    arrays = hyperprior.to_arrays(tiny_context_model())
    for name, value in (("integer_context.2.1_0.shift1", 41), ("integer_context.2.0_1.bias0", 2**41)):
        broken = dict(arrays)
        broken[name] = np.full_like(arrays[name], value)
        save_weights(broken, tmp_path / "bad.npz")
        with pytest.raises(WeightsError, match="out of range"):
            load_weights(tmp_path / "bad.npz")
        coding, _ = load_weights(tmp_path / "bad.npz", coding=True)  # checked when the quality is used
        with pytest.raises(ValueError, match="out of range"):
            coding.context_networks(3)
    missing = {k: v for k, v in arrays.items() if not k.startswith("integer_context.1.1_1.")}
    save_weights(missing, tmp_path / "missing.npz")
    with pytest.raises(WeightsError, match="lack the context network integer_context.1.1_1"):
        load_weights(tmp_path / "missing.npz")
    config = bytes(arrays["config"]).decode().replace('"slices": 2', '"slices": 3')
    save_weights({**arrays, "config": np.frombuffer(config.encode(), np.uint8)}, tmp_path / "slices.npz")
    with pytest.raises(WeightsError, match="do not split into 3 slices"):
        load_weights(tmp_path / "slices.npz", coding=True)


def test_truncated_yhat_fails_with_one_message(weights):
    data = api.encode_pixels(smooth_image(64, 64), 3, weights)
    parsed = container.unpack(data)
    z, y = parsed.substreams()
    model, _ = load_weights(weights, coding=True)
    for payload in (y.data[: len(y.data) // 8 * 4], y.data[:4]):
        with pytest.raises(FormatError, match="substream yhat is corrupt"):
            hyperprior.decompress(model, 3, 64, 64, False, [z, Substream(b"yhat", y.shape, payload)],
                                  lambda rows: None)


def test_training_bits_reach_the_context_networks():
    model = tiny_context_model().train()
    y = torch.randn(2, 16, 6, 6) * 3
    _, y_bits, _ = model.latent_bits(y, 3, rounded=True)
    y_bits.sum().backward()
    for name, net in model.context[2].nets.items():
        assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0, name


def test_effort_two_files_decode(weights):
    """The search sees h_s's (μ, t); the passes then code what it chose under their own."""
    image = smooth_image(64, 80)
    data = api.encode_pixels(image, 3, weights, effort=2)
    decoded = api.decode_pixels(data, weights).pixels.astype(np.float64)
    plain = api.decode_pixels(api.encode_pixels(image, 3, weights), weights).pixels.astype(np.float64)
    assert decoded.shape == image.shape
    assert abs(np.mean((decoded - image) ** 2) - np.mean((plain - image) ** 2)) < 0.5 * np.mean((plain - image) ** 2)


def test_effort_two_never_costs_more_than_effort_one(weights):
    """Each candidate file (effort 1's, the search's integers, where the latent
    optimization ended) is measured, and the cheapest kept: J = bits + λ·SSE/channels."""
    from nic.weights import load_weights

    lam = load_weights(weights)[0].base.config.lambdas[2] / 3
    for seed in range(3):
        image = smooth_image(48, 64, seed=seed)
        costs = []
        for effort in (1, 2):
            data = api.encode_pixels(image, 3, weights, effort=effort, family="hyperprior")
            error = api.decode_pixels(data, weights).pixels.astype(np.int64) - image
            costs.append(8 * len(data) + lam * float(np.sum(error * error)))
        assert costs[1] <= costs[0] + 1e-6, costs


def test_pass_means_are_the_means_the_encoder_codes_with(weights, monkeypatch):
    """Effort 2's search runs under hyperprior._pass_means: each latent's (μ, t) exactly
    as the passes code effort 1's latents, block by block (several blocks here)."""
    from nic import context
    from nic.tiling import LatentStore

    monkeypatch.setattr(hyperprior, "BLOCK", 4)
    model, _ = load_weights(weights, coding=True)
    y = hyperprior.analysis(model, smooth_image(100, 150), 3)
    z_hat = model.hyper_encode(y, 3)
    target = LatentStore(y.shape, array=y)
    mean, index = hyperprior._pass_means(model, 3, z_hat, target)
    seen_mean, seen_index = np.full(y.shape, np.nan), np.full(y.shape, -1)
    run_passes, blocks = context.run_passes, iter(
        (r, cs) for r in hyperprior.bands(y.shape[1]) for cs in hyperprior.bands(y.shape[2]))

    def recording(networks, hyper_mean, hyper_index, slices, checkerboard, scales, residuals, **kwargs):
        (r0, r1), (c0, c1) = next(blocks)
        c = y.shape[0] // slices

        def record(s, where, mu, t):
            seen_mean[s * c:(s + 1) * c, r0:r1, c0:c1][:, where] = mu
            seen_index[s * c:(s + 1) * c, r0:r1, c0:c1][:, where] = t
            return residuals(s, where, mu, t)

        return run_passes(networks, hyper_mean, hyper_index, slices, checkerboard, scales, record, **kwargs)

    monkeypatch.setattr(context, "run_passes", recording)
    hyperprior._encode_blocks(model, 3, z_hat, target)
    assert np.array_equal(mean, seen_mean) and np.array_equal(index, seen_index)


def test_blocks_give_the_whole_image_means_and_decode(weights, monkeypatch):
    """ŷ in blocks of latents: each block's h_s output equals the whole image's, and files
    of several blocks (context cut at block edges) decode, in memory or spilled."""
    model, _ = load_weights(weights, coding=True)
    image = smooth_image(200, 130)
    y = hyperprior.analysis(model, image, 3)
    z_hat = model.hyper_encode(y, 3)
    whole = model.hyper_decode(z_hat, 3, *y.shape[1:])
    for rows in ((0, 4), (4, 8), (12, 13), (3, 10), (0, 13)):
        for cols in ((0, 4), (4, 8), (8, 9), (1, 6), (0, 9)):
            part = hyperprior.hyper_decode_block(model, z_hat, 3, rows, cols)
            for a, b in zip(part, whole):
                np.testing.assert_array_equal(a, b[:, slice(*rows), slice(*cols)])
    monkeypatch.setattr(hyperprior, "BLOCK", 4)
    assert hyperprior.blocks(5, 9) == [((0, 4), (0, 4)), ((0, 4), (4, 8)), ((0, 4), (8, 9)),
                                       ((4, 5), (0, 4)), ((4, 5), (4, 8)), ((4, 5), (8, 9))]
    data = api.encode_pixels(image, 3, weights)
    decoded = api.decode_pixels(data, weights)
    spilled = []
    substreams = hyperprior.compress(model, image, 3, spill_bytes=0)
    assert b"".join(s.data for s in substreams) == b"".join(s.data for s in container.unpack(data).substreams())
    hyperprior.decompress(model, 3, 200, 130, False, substreams, spilled.append, spill_bytes=0)
    np.testing.assert_array_equal(np.concatenate(spilled), decoded.pixels)
    monkeypatch.setattr(hyperprior, "BLOCK", 6)
    with pytest.raises(ValueError, match="multiple of 4"):
        hyperprior.compress(model, image, 3)
