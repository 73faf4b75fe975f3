"""Specialized qualities: a quality with a g_a/g_s pair of its own (nic.factorized.specialize)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import smooth_image
from nic.api import decode_pixels, encode_pixels
from nic.factorized import quantize_latents, reconstruct
from nic.cli import cli
from nic.factorized import Codec, Config, Transforms, from_arrays, pair_shapes, specialize, to_arrays
from nic.weights import WeightsError, load_weights, save_weights

TINY = ["--patch", "32", "--batch", "2", "--no-bf16", "--log-every", "1"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> Codec:
    torch.manual_seed(seed)
    model = Codec(Config(N=8, M=8)).eval()
    model.export_tables()
    return model


def perturbed(model: Codec, seed: int) -> Codec:
    """A copy with every parameter moved a little: stands in for a model trained further."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    other.export_tables()
    return other


def assert_codes_alike(model: Codec, reference: Codec, qualities: tuple[int, ...]) -> None:
    """The same latents and the same reconstruction at each of ``qualities``."""
    pixels = smooth_image(40, 56)
    for quality in qualities:
        latents = quantize_latents(reference, pixels, quality)
        assert np.array_equal(quantize_latents(model, pixels, quality), latents)
        assert np.array_equal(reconstruct(model, latents, quality, 40, 56, False),
                              reconstruct(reference, latents, quality, 40, 56, False))


def test_a_fresh_specialization_codes_exactly_like_the_shared_pair():
    model = tiny_model()
    special = specialize(model, [2])
    assert special.config.specialized == (2,) and set(special.own) == {"q2"}
    assert_codes_alike(special, model, (1, 2, 3))


def test_a_mixed_batch_is_each_sample_through_its_own_pair():
    special = specialize(tiny_model(), [2, 5])
    with torch.no_grad():
        for param in special.own.parameters():
            param.add_(0.05 * torch.randn_like(param))
    x = torch.rand(5, 3, 32, 32)
    qualities = torch.tensor([2, 1, 5, 2, 8])
    with torch.no_grad():
        together, bits = special(x, qualities, hard=True)
        alone = [special(x[i:i + 1], qualities[i:i + 1], hard=True) for i in range(5)]
    torch.testing.assert_close(together, torch.cat([a[0] for a in alone]), rtol=0, atol=1e-5)
    torch.testing.assert_close(bits, torch.cat([a[1] for a in alone]))


def test_grafting_takes_the_donors_quality_and_keeps_the_rest():
    base = tiny_model()
    donor = perturbed(base, seed=1)
    grafted = specialize(base, [], {3: donor})
    pixels = smooth_image(32, 48)
    for quality, source in ((3, donor), (1, base), (4, base)):
        latents = quantize_latents(source, pixels, quality)
        assert np.array_equal(quantize_latents(grafted, pixels, quality), latents)
        assert np.array_equal(reconstruct(grafted, latents, quality, 32, 48, False),
                              reconstruct(source, latents, quality, 32, 48, False))
        assert np.array_equal(grafted.tables[quality - 1].frequencies, source.tables[quality - 1].frequencies)
    with pytest.raises(ValueError, match="another M"):
        specialize(base, [], {2: Codec(Config(N=8, M=16))})
    # A donor of another width (a model trained alone, wider) brings its width along.
    assert specialize(base, [], {2: Codec(Config(N=12, M=8))}).config.specialized_N == (12,)
    with pytest.raises(ValueError, match="not one of"):
        specialize(base, [9])


def test_specialized_weights_round_trip_through_a_file(tmp_path):
    base = tiny_model()
    special = specialize(base, [], {2: perturbed(base, seed=2)})
    path = tmp_path / "special.npz"
    digest = save_weights(to_arrays(special, half=True), path)
    arrays = dict(np.load(path))
    assert arrays["own.q2.g_a.0.weight"].dtype == np.float16 and arrays["own.q2.g_s.1.beta"].dtype == np.float32
    loaded, loaded_digest = load_weights(path)
    assert loaded_digest == digest and loaded.config.specialized == (2,)
    pixels = smooth_image(24, 40)
    for quality in (1, 2):
        data = encode_pixels(pixels, quality, weights=path)
        decoded = decode_pixels(data, weights=path).pixels
        assert decoded.shape == pixels.shape
    # A pair missing from the file is refused.
    del arrays["own.q2.g_s.0.weight"]
    save_weights(arrays, tmp_path / "partial.npz")
    with pytest.raises(WeightsError, match="lack tensor own.q2.g_s.0.weight"):
        load_weights(tmp_path / "partial.npz")


def test_a_config_claiming_pairs_the_file_lacks_is_refused_before_they_are_built(tmp_path, monkeypatch):
    arrays = to_arrays(tiny_model())
    config = json.loads(bytes(arrays["config"]).decode())
    config["specialized"] = list(range(1, 9))
    arrays["config"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
    save_weights(arrays, tmp_path / "claims.npz")

    def no_pairs(*args):
        raise AssertionError("own pairs built before the file was checked")

    monkeypatch.setattr("nic.factorized.Transforms", no_pairs)
    with pytest.raises(WeightsError, match="lack tensor own.q1."):
        load_weights(tmp_path / "claims.npz")


@pytest.mark.parametrize("value", [[9], [2, 1], [1, 1], [True], [0], "2", [2.0]])
def test_config_refuses_a_bad_specialized_list(value):
    fields = json.loads(Config().to_json())
    fields["specialized"] = value
    with pytest.raises(ValueError, match="specialized"):
        Config.from_json(json.dumps(fields))


def test_weights_without_specialized_qualities_keep_their_config_bytes():
    # Weights made before specialization existed must keep their hash when re-exported.
    assert "specialized" not in json.loads(Config().to_json())
    assert Config.from_json(Config().to_json()) == Config()
    assert from_arrays(to_arrays(tiny_model())).config.specialized == ()


def checkpoint_state(folder: Path) -> tuple[Config, dict]:
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    return Config.from_json(state["config"]), state["model"]


def test_train_specialize_trains_only_that_quality(tmp_path, photos):
    base = tiny_model()
    init = tmp_path / "base.npz"
    save_weights(to_arrays(base), init)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(out), "--steps", "2", "--init", str(init),
                                      "--quality", "2", "--specialize", "--lr", "1e-2", *TINY])
    assert result.exit_code == 0, result.output
    config, after = checkpoint_state(out)
    assert config.specialized == (2,)
    before = base.state_dict()
    for name, value in before.items():
        if name.startswith(("g_a.", "g_s.")):
            assert torch.equal(after[name], value), name  # the shared pair is untouched
    assert not torch.equal(after["own.q2.g_a.0.weight"], before["g_a.0.weight"])
    M = config.M
    for name in ("gain", "inverse_gain"):
        changed = (after[name] != before[name]).any(dim=1)
        assert changed.tolist() == [q == 2 for q in range(1, 9)], name
    for name, value in before.items():
        if name.startswith("density."):
            rows = (after[name] != value).reshape(len(value), -1).any(dim=1)
            assert not rows[:M].any() and not rows[2 * M:].any(), name
    # Decoder fine-tuning of the specialized quality moves its own g_s only.
    special = tmp_path / "special.npz"
    assert CliRunner().invoke(cli, ["export", str(out / "checkpoint.pt"), "-o", str(special)]).exit_code == 0
    ft = tmp_path / "ft"
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(ft), "--steps", "2", "--init", str(special),
                                      "--quality", "2", "--finetune-decoder", "--lr", "1e-2", *TINY])
    assert result.exit_code == 0, result.output
    tuned = checkpoint_state(ft)[1]
    changed = {name for name, value in after.items() if not torch.equal(value, tuned[name])}
    assert changed and all(name.startswith("own.q2.g_s.") or name == "inverse_gain" for name in changed), changed


def test_specialize_needs_init_and_quality(tmp_path, photos, tiny_weights):
    for extra in ([], ["--init", tiny_weights], ["--quality", "1"],
                  ["--init", tiny_weights, "--quality", "1", "--finetune-decoder"]):
        result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "x"), "--steps", "1",
                                          "--specialize", *extra, *TINY])
        assert result.exit_code == 1 and "--specialize needs" in result.output, result.output
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_graft_tool(tmp_path):
    base, donor = tiny_model(), perturbed(tiny_model(), seed=4)
    save_weights(to_arrays(base), tmp_path / "base.npz")
    save_weights(to_arrays(donor), tmp_path / "q5.npz")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "graft_qualities.py"), str(tmp_path / "base.npz"),
                             "-q", f"5={tmp_path / 'q5.npz'}", "-o", str(tmp_path / "out.npz")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "graft_qualities.py"), str(tmp_path / "base.npz"),
                             "-q", f"5={broken}", "-o", str(tmp_path / "none.npz")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "not a valid weights file" in result.stderr
    assert not (tmp_path / "none.npz").exists()
    model = load_weights(tmp_path / "out.npz")[0]
    assert model.config.specialized == (5,)
    assert torch.equal(model.transforms(5)[1][0].weight, donor.g_s[0].weight)


def test_specialize_can_retarget_a_qualitys_lambda(tmp_path, photos, tiny_weights):
    out = tmp_path / "run"
    args = ["train", str(photos), "--out", str(out), "--steps", "1", "--init", tiny_weights, "--specialize",
            "--quality", "1", "--lambda", "0.001", *TINY]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = checkpoint_state(out)[0]
    assert config.lambdas[0] == 0.001 and config.lambdas[1:] == Config().lambdas[1:]
    for extra, message in ((["--quality", "2", "--lambda", "0.5"], "λ must increase"),
                           (["--quality", "2", "--lambda", "0.003", "--lambda", "0.004"], "one --lambda per")):
        result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "bad"), "--steps", "1",
                                          "--init", tiny_weights, "--specialize", *extra, *TINY])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "bad").exists()
    # A grafted donor brings its own λ for its quality.
    donor = perturbed(tiny_model(), seed=5)
    donor.config = Config(N=8, M=8, lambdas=(0.001, *Config().lambdas[1:]))
    assert specialize(tiny_model(), [], {1: donor}).config.lambdas[0] == 0.001


def test_training_only_specialized_qualities_leaves_the_shared_pair(tmp_path, photos):
    # Without --specialize too: a pair no trained quality runs through must not learn
    # (under DistributedDataParallel it would wait forever for its gradients).
    base = tiny_model()
    special = specialize(base, [], {2: perturbed(base, seed=6)})
    init = tmp_path / "special.npz"
    save_weights(to_arrays(special), init)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(out), "--steps", "2", "--init", str(init),
                                      "--quality", "2", "--lr", "1e-2", *TINY])
    assert result.exit_code == 0, result.output
    after = checkpoint_state(out)[1]
    before = special.state_dict()
    assert all(torch.equal(after[n], v) for n, v in before.items() if n.startswith(("g_a.", "g_s."))), \
        "the shared pair moved"
    assert not torch.equal(after["own.q2.g_a.0.weight"], before["own.q2.g_a.0.weight"])


def test_a_widened_pair_codes_exactly_like_the_narrower_one():
    model = specialize(tiny_model(), [], {3: perturbed(tiny_model(), seed=7)})
    wide = specialize(model, [3, 5], widths={3: 12, 5: 16})
    assert wide.config.specialized == (3, 5) and wide.config.specialized_N == (12, 16)
    assert [wide.config.pair_N(q) for q in (1, 3, 5)] == [8, 12, 16]
    assert wide.own.q3.g_a[2].weight.shape == (12, 12, 5, 5) and wide.own.q5.g_s[6].weight.shape == (16, 3, 5, 5)
    assert_codes_alike(wide, model, (1, 3, 5))
    # The added channels are live (a new GDN channel is normalized by itself), only their
    # way into the old channels is closed, so training opens it from the first step.
    with torch.no_grad():
        hidden = wide.own.q3.g_a[:2](torch.rand(1, 3, 32, 32))
    assert hidden[:, 8:].abs().sum() > 0
    assert not wide.own.q3.g_a[2].weight[:8, 8:].any() and wide.own.q3.g_a[2].weight[8:].any()
    assert not wide.own.q3.g_s[2].weight[8:, :8].any()  # transposed: (in, out, k, k)


def test_widths_are_checked():
    model = specialize(tiny_model(), [2], widths={2: 12})
    for qualities, widths, message in (([2], {2: 10}, "from 12 to at most"), ([3], {4: 12}, "not being specialized"),
                                       ([3], {3: 2000}, "at most 1024")):
        with pytest.raises(ValueError, match=message):
            specialize(model, qualities, widths=widths)
    # Re-specializing keeps the width; a pair of the shared width lists no widths at all.
    assert specialize(model, [3]).config.specialized_N == (12, 8)
    assert specialize(tiny_model(), [3], widths={3: 8}).config.specialized_N == ()


def test_a_widened_pair_round_trips_through_a_file(tmp_path):
    wide = specialize(tiny_model(), [4], widths={4: 16})
    path = tmp_path / "wide.npz"
    digest = save_weights(to_arrays(wide, half=True), path)
    loaded, loaded_digest = load_weights(path)
    assert loaded_digest == digest and loaded.config == wide.config
    pixels = smooth_image(24, 40)
    assert decode_pixels(encode_pixels(pixels, 4, weights=path), weights=path).pixels.shape == pixels.shape
    # A file whose pair has other shapes than its config says is refused, by name.
    arrays = dict(np.load(path))
    config = json.loads(bytes(arrays["config"]).decode())
    config["specialized_N"] = [24]
    arrays["config"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
    save_weights(arrays, tmp_path / "lies.npz")
    with pytest.raises(WeightsError, match=r"tensor own.q4.g_a.0.weight has shape \(16, 3, 5, 5\), expected"):
        load_weights(tmp_path / "lies.npz")
    # A pair is filled only when its quality is used, so what it holds is checked at load.
    arrays = dict(np.load(path))
    arrays["own.q4.g_s.0.bias"] = np.array(["x"] * len(arrays["own.q4.g_s.0.bias"]))
    save_weights(arrays, tmp_path / "text.npz")
    with pytest.raises(WeightsError, match="tensor own.q4.g_s.0.bias has dtype <U1, expected floating point"):
        load_weights(tmp_path / "text.npz")


@pytest.mark.parametrize("value", [[16, 16], [0], [True], "16", [2000]])
def test_config_refuses_a_bad_specialized_N(value):
    fields = json.loads(Config().to_json())
    fields["specialized"] = [2]
    fields["specialized_N"] = value
    with pytest.raises(ValueError, match="specialized_N"):
        Config.from_json(json.dumps(fields))


def test_train_specialize_can_widen_the_pair(tmp_path, photos, tiny_weights):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(out), "--steps", "2", "--init", tiny_weights,
                                      "--specialize", "--quality", "8", "--own-N", "20", "--lr", "1e-2", *TINY])
    assert result.exit_code == 0, result.output
    config, after = checkpoint_state(out)
    assert config.specialized == (8,) and config.pair_N(8) == 20
    assert after["own.q8.g_s.2.weight"][16:, :16].any(), "the new channels did not start to feed the old ones"
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "bad"), "--steps", "1",
                                      "--init", tiny_weights, "--quality", "8", "--own-N", "20", *TINY])
    assert result.exit_code == 2 and "--own-N widens the pairs of --specialize" in result.output, result.output
    assert not (tmp_path / "bad").exists()


def test_a_loaded_file_builds_an_own_pair_when_its_quality_is_first_used(tmp_path):
    special = specialize(tiny_model(), [], {2: perturbed(tiny_model(), seed=8), 5: perturbed(tiny_model(), seed=9)})
    path = tmp_path / "special.npz"
    save_weights(to_arrays(special), path)
    loaded = from_arrays(dict(np.load(path)))
    assert set(loaded.unbuilt) == {2, 5} and len(loaded.own) == 0
    pixels = smooth_image(24, 40)
    assert np.array_equal(quantize_latents(loaded, pixels, 2), quantize_latents(special, pixels, 2))
    assert set(loaded.unbuilt) == {5} and set(loaded.own) == {"q2"}
    # Whatever reads every parameter gets them all: a state dict of a half-built model
    # would be a weights file without its pairs.
    assert set(loaded.state_dict()) == set(special.state_dict()) and not loaded.unbuilt
    assert all(torch.equal(value, special.state_dict()[name]) for name, value in loaded.state_dict().items())
    # A pair first used under inference mode still takes gradients later (encoder effort 2..4).
    with torch.inference_mode():
        loaded.transforms(5)
    loaded = from_arrays(dict(np.load(path)))
    with torch.inference_mode():
        quantize_latents(loaded, pixels, 5)
    latents = torch.zeros(1, 8, 2, 3, requires_grad=True)
    loaded.synthesis(latents, 5).sum().backward()
    assert latents.grad is not None
    for touch in (lambda m: list(m.parameters()), lambda m: m.to(torch.float32),
                  lambda m: m.load_state_dict(special.state_dict())):
        model = from_arrays(dict(np.load(path)))
        touch(model)
        assert not model.unbuilt and set(model.own) == {"q2", "q5"}


@pytest.mark.parametrize("N, M", [(8, 8), (12, 20), (128, 192)])
def test_pair_shapes_are_those_of_the_transforms(N, M):
    assert pair_shapes(N, M) == {name: tuple(t.shape) for name, t in Transforms(N, M).state_dict().items()}


def test_threads_sharing_a_loaded_model_build_each_pair_once(tmp_path):
    import threading

    special = specialize(tiny_model(), [2, 5])
    path = tmp_path / "special.npz"
    save_weights(to_arrays(special), path)
    loaded = from_arrays(dict(np.load(path)))
    built = []
    original = loaded._build_pair
    loaded._build_pair = lambda quality: (built.append(quality), original(quality))
    pixels = smooth_image(24, 40)
    errors = []

    def encode(quality):
        try:
            quantize_latents(loaded, pixels, quality)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=encode, args=(q,)) for q in (2, 5, 2, 5, 2, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(built) == [2, 5]
