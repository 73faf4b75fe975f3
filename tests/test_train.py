"""nic train / export on a tiny model and tiny generated photos (seconds, not minutes)."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nic.cli import cli
from conftest import smooth_image

TINY = ["--N", "8", "--M", "8", "--patch", "32", "--batch", "2", "--no-bf16", "--log-every", "1"]


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_resume_validate_and_export(tmp_path, photos):
    out = tmp_path / "run"
    args = ["train", str(photos), "--out", str(out), "--steps", "3", "--holdout", "2", *TINY]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3]
    validation = read_log(out / "validation.csv")
    assert len(validation) == 8 and all(float(r["bpp"]) > 0 for r in validation)
    # Resume: a larger step budget continues from step 3.
    args[args.index("3")] = "5"
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3, 4, 5]
    result = CliRunner().invoke(cli, ["export", str(out / "checkpoint.pt"), "-o", str(tmp_path / "w.npz")])
    assert result.exit_code == 0, result.output
    pixels = smooth_image(20, 30)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    assert CliRunner().invoke(cli, ["encode", str(tmp_path / "img.png"), "--weights", str(tmp_path / "w.npz"),
                                    "-o", str(tmp_path / "img.nic")]).exit_code == 0
    assert CliRunner().invoke(cli, ["decode", str(tmp_path / "img.nic"), "--weights", str(tmp_path / "w.npz"),
                                    "-o", str(tmp_path / "out.png")]).exit_code == 0


@pytest.mark.parametrize("effort", [1, 2])
def test_decoder_finetuning_changes_only_the_decoder(tmp_path, photos, tiny_weights, effort):
    out = tmp_path / "ft"
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(out), "--steps", "2", "--init", tiny_weights,
                                      "--finetune-decoder", "--finetune-effort", str(effort), "--lr", "1e-2",
                                      *TINY[:-2]])
    assert result.exit_code == 0, result.output
    import torch

    from nic.weights import load_weights

    before = load_weights(tiny_weights)[0].state_dict()
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert any(name.startswith("g_s.") for name in changed)
    assert all(name.startswith("g_s.") or name == "inverse_gain" for name in changed), changed
    from nic.factorized import Config

    assert Config.from_json(torch.load(out / "checkpoint.pt", weights_only=True)["config"]).decoder_finetuned


def test_effort_latents_are_what_the_encoder_sends(tiny_weights):
    import torch

    from nic.quantization import quantize
    from nic.train import effort_latents
    from nic.weights import load_weights

    model = copy.deepcopy(load_weights(tiny_weights)[0])  # the loaded one is shared (cached)
    pixels = smooth_image(32, 32, seed=3)
    expected = torch.from_numpy(quantize(model, pixels, 2, 2))
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    for param in model.g_s.parameters():
        param.requires_grad_(True)
        param.grad = None
    x8, latents = effort_latents(model, x, torch.tensor([2]), 2)
    assert torch.equal(x8, x)  # already 8-bit
    assert torch.equal(latents[0].long(), expected)
    assert all(p.grad is None and p.requires_grad for p in model.g_s.parameters())  # the search left no gradients


def test_finetune_effort_needs_finetune_decoder(tmp_path, photos):
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "x"), "--steps", "1",
                                      "--finetune-effort", "2", *TINY])
    assert result.exit_code == 1 and "needs --finetune-decoder" in result.output


def test_training_refuses_kodak(tmp_path):
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    Image.fromarray(smooth_image(64, 64)).save(kodak / "kodim01.png")
    result = CliRunner().invoke(cli, ["train", str(kodak), "--out", str(tmp_path / "r"), "--steps", "1", *TINY])
    assert result.exit_code == 1 and "Kodak" in result.output


def test_torchrun_with_two_processes(tmp_path, photos):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "nic", "train", str(photos), "--out", str(tmp_path / "ddp"), "--steps", "3", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_log(tmp_path / "ddp" / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()


def test_hard_latents_are_the_encoders_even_under_bf16(tiny_weights):
    """Decoder fine-tuning must see exactly the integers the encoder sends."""
    import torch

    from nic.tiling import quantize_tiled
    from nic.weights import load_weights
    from conftest import smooth_image

    model = load_weights(tiny_weights)[0]
    pixels = smooth_image(64, 48)
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    seen = {}
    handle = model.g_s.register_forward_pre_hook(lambda module, args: seen.setdefault("y", args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, torch.tensor([3]), hard=True)
    handle.remove()
    scaled = seen["y"].float() / model.inverse_gain[2].reshape(1, -1, 1, 1)
    assert torch.equal(torch.round(scaled)[0].long(), torch.from_numpy(quantize_tiled(model, pixels, 3)))


def test_mixed_decodes_rounded_latents_and_trains_the_encoder_through_them(tiny_weights):
    """--mixed: g_s sees round(y) (a straight-through gradient reaches g_a), the rate is the noisy ỹ's."""
    import torch

    from nic.weights import load_weights
    from conftest import smooth_image

    model = load_weights(tiny_weights)[0].train()
    x = torch.from_numpy(smooth_image(64, 48)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    qualities = torch.tensor([3])
    seen = []
    handle = model.g_s.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    torch.manual_seed(5)
    noisy_out, noisy_bits = model(x, qualities)
    torch.manual_seed(5)
    mixed_out, mixed_bits = model(x, qualities, mixed=True)
    handle.remove()
    assert torch.equal(noisy_bits, mixed_bits)  # the same noise, the same rate term
    y = seen[1] / model.inverse_gain[2].reshape(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.round(model.analysis(x, 3))
    assert torch.allclose(y, expected, atol=1e-4) and not torch.allclose(seen[0], seen[1])
    mixed_out.square().mean().backward()
    assert model.g_a[0].weight.grad is not None and model.g_a[0].weight.grad.abs().sum() > 0


def test_compiled_training_matches_eager(tmp_path, photos):
    """--compile changes the speed, not the arithmetic (beyond float reassociation)."""
    losses = {}
    for flag in ("", "--compile"):
        out = tmp_path / f"run{flag}"
        args = ["train", str(photos), "--out", str(out), "--steps", "2", *TINY] + ([flag] if flag else [])
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        losses[flag] = [float(r["loss"]) for r in read_log(out / "log.csv")]
    assert np.allclose(losses[""], losses["--compile"], rtol=1e-3), losses


def test_validation_folder(tmp_path, photos):
    """--validate DIR: validated on (real bpp and PSNR per quality), never trained on."""
    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(smooth_image(40, 56, seed=9)).save(val / "v.png")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(out), "--steps", "2",
                                      "--validate", str(val), *TINY])
    assert result.exit_code == 0, result.output
    rows = read_log(out / "validation.csv")
    assert [int(r["quality"]) for r in rows] == list(range(1, 9)) and all(float(r["bpp"]) > 0 for r in rows)
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "run2"), "--steps", "2",
                                      "--validate", str(photos), *TINY])
    assert result.exit_code == 1 and "every training image is also a --validate image" in result.output


def test_lambda_sets_up_a_new_model(tmp_path, photos):
    out = tmp_path / "run"
    args = ["train", str(photos), "--out", str(out), "--steps", "1", "--lambda", "0.02", "--lambda", "0.005", *TINY]
    assert CliRunner().invoke(cli, args).exit_code == 0
    weights = tmp_path / "w.npz"
    assert CliRunner().invoke(cli, ["export", str(out / "checkpoint.pt"), "-o", str(weights)]).exit_code == 0
    from nic.weights import load_weights

    assert load_weights(weights)[0].config.lambdas == (0.005, 0.02)  # sorted: quality 1 is the smallest
    changed = [*args[:-len(TINY)], *TINY]
    changed[changed.index("0.02")] = "0.03"  # resuming with other λ is refused
    result = CliRunner().invoke(cli, changed)
    assert result.exit_code == 1 and "was trained for λ" in result.output
    wider = [*args[:-len(TINY)], *TINY, "--N", "16"]  # and so is resuming as another size of model
    result = CliRunner().invoke(cli, wider)
    assert result.exit_code == 1 and "is a model of --N 8 --M 8, not --N 16: resume with its sizes" in result.output
    sizes_left_out = [a for a in args if a not in ("--N", "--M", "8")]  # resumed as it is
    assert CliRunner().invoke(cli, sizes_left_out).exit_code == 0
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "r2"), "--steps", "1",
                                      "--lambda", "0.02", "--quality", "3", *TINY])
    assert result.exit_code == 1 and "qualities 1..1" in result.output
    # nic encode's default quality (4) is capped at the weights' highest, here 2
    Image.fromarray(smooth_image(24, 40)).save(tmp_path / "a.png")
    result = CliRunner().invoke(cli, ["encode", str(tmp_path / "a.png"), "--weights", str(weights),
                                      "-o", str(tmp_path / "a.nic")])
    assert result.exit_code == 0, result.output
    from nic.container import parse_header

    assert parse_header((tmp_path / "a.nic").read_bytes()).quality == 2


def test_bad_options_are_refused_before_anything_is_written(tmp_path, photos):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--lambda", "0.02", "--quality", "3"], 1, "the model has qualities 1..1"),
        (["--lambda", "0.02", "--init", str(tmp_path / "w.npz")], 2, "--init weights keep their own λ"),
        (["--lambda", "0.02", "--lambda", "0.02"], 2, "different values"),
        (["--lambda", "inf"], 2, "--lambda"),
        (["--validate", str(empty)], 1, "no validation images found"),
        (["--finetune-effort", "2"], 1, "--finetune-effort 2..4 needs --finetune-decoder"),
        (["--mixed", "--finetune-decoder", "--init", str(tmp_path / "w.npz")], 1, "already decodes rounded"),
    ]
    for args, code, message in cases:
        out = tmp_path / "run"
        result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(out), "--steps", "1", *args, *TINY])
        assert result.exit_code == code and message in result.output, (args, result.output)
        assert not out.exists(), args  # refused before the run folder is made or an image is read


def test_validate_images_inside_the_training_folder_are_not_trained_on(tmp_path, photos, monkeypatch):
    import nic.train

    loaded = []
    real_load = nic.train.load_rgb
    monkeypatch.setattr(nic.train, "load_rgb", lambda path: loaded.append(path.resolve()) or real_load(path))
    val = photos / "val"
    val.mkdir()
    Image.fromarray(smooth_image(40, 56, seed=9)).save(val / "v.png")
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "run"), "--steps", "1",
                                      "--holdout", "1", "--validate", str(val), *TINY])
    assert result.exit_code == 0, result.output
    # 7 images found: 1 held out, v.png validated only; 5 trained on. Each is read once.
    assert len(loaded) == len(set(loaded)) == 7 and (val / "v.png").resolve() in loaded
    assert len(read_log(tmp_path / "run" / "validation.csv")) == 8  # one row per quality


def test_compile_without_a_compiler_is_a_one_line_error(tmp_path, photos, monkeypatch):
    monkeypatch.setattr("nic.cli.shutil.which", lambda name: None)
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "run"), "--steps", "1",
                                      "--compile", *TINY])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "--compile needs a C++ compiler" in result.output and not (tmp_path / "run").exists()


def test_compile_failures_at_the_first_step_become_one_line():
    """torch.compile fails lazily with a page of text; only its own errors are rewritten."""
    from nic.train import _compile_errors

    Failure = type("InvalidCxxCompiler", (RuntimeError,), {"__module__": "torch._inductor.exc"})
    with pytest.raises(ValueError, match=r"^--compile failed \(InvalidCxxCompiler: no compiler\); train without"):
        with _compile_errors(True):
            raise Failure("no compiler\nSet TORCH_LOGS=+dynamo for more")
    with pytest.raises(Failure):
        with _compile_errors(False):
            raise Failure("not compiling: not ours to rewrite")
    with pytest.raises(KeyError):
        with _compile_errors(True):
            raise KeyError("a bug elsewhere stays a bug")


def test_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch):
    import torch

    from nic.train import bf16_is_fast

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not bf16_is_fast("cpu")  # AVX2 only: emulated bf16, 10-25x slower than fp32
    assert bf16_is_fast("cuda")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert bf16_is_fast("cpu")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not bf16_is_fast("cpu")  # a torch without the probe: the safe choice


@pytest.mark.parametrize("fast", [False, True])
def test_train_picks_bf16_by_the_cpu_unless_told(tmp_path, photos, monkeypatch, fast):
    import torch

    import nic.train

    monkeypatch.setattr(nic.train, "bf16_is_fast", lambda device: fast)
    used = []
    autocast = torch.autocast

    def spy(*args, **kwargs):
        used.append(kwargs.get("enabled"))
        return autocast(*args, **kwargs)

    monkeypatch.setattr(nic.train.torch, "autocast", spy)
    tiny = [a for a in TINY if a != "--no-bf16"]
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "a"), "--steps", "1", *tiny])
    assert result.exit_code == 0, result.output
    assert ("bf16 autocast" if fast else "fp32 (no bf16 instructions") in result.output
    assert used == [fast]
    used.clear()
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "b"), "--steps", "1",
                                      *tiny, "--no-bf16" if fast else "--bf16"])
    assert result.exit_code == 0, result.output
    assert "instructions" not in result.output and used == [not fast]


def test_export_writes_a_file_and_refuses_what_is_not_one(tmp_path, photos):
    out = tmp_path / "run"
    assert CliRunner().invoke(cli, ["train", str(photos), "--out", str(out), "--steps", "1", *TINY]).exit_code == 0
    checkpoint = str(out / "checkpoint.pt")
    cases = [([checkpoint, "-o", os.devnull], 1, "not here"), ([checkpoint, "-o", checkpoint], 1, "checkpoint"),
             ([checkpoint, "-o", str(tmp_path / "missing" / "w.npz")], 1, "directory does not exist")]
    torch = pytest.importorskip("torch")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"foo": 1}, tmp_path / "keys.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name in ("garbage.pt", "empty.pt", "keys.pt", "list.pt"):
        cases.append(([str(tmp_path / name), "-o", str(tmp_path / "w.npz")], 1, "not a nic training checkpoint"))
    for args, code, message in cases:
        result = CliRunner().invoke(cli, ["export", *args])
        assert result.exit_code == code and message in result.output, (args, result.output)
        if code == 1:
            assert result.output.startswith("nic: error: ") and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "w.npz").exists() and not os.path.isfile(os.devnull)


@pytest.mark.parametrize("args,message", [
    (["--minutes", "0"], "--minutes"), (["--minutes", "nan"], "finite"), (["--minutes", "inf"], "finite"),
    (["--steps", "1", "--lr", "nan"], "finite"), (["--steps", "1", "--device", "bogus"], "--device"),
])
def test_train_refuses_budgets_and_settings_that_cannot_run(tmp_path, photos, args, message):
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "run"), *TINY, *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_train_names_an_unreadable_image_and_a_checkpoint_it_cannot_resume(tmp_path, photos):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("hello")
    result = CliRunner().invoke(cli, ["train", str(bad), "--out", str(tmp_path / "r1"), "--steps", "1", *TINY])
    assert result.exit_code == 1 and f"{bad / 'x.png'}: cannot read image" in result.output, result.output
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "r2"), "--steps", "1", *TINY])
    assert result.exit_code == 1 and "not a nic training checkpoint" in result.output, result.output


def test_training_stopped_by_sigterm_exits_143(tmp_path, photos, monkeypatch):
    """nic train saves its checkpoint on SIGTERM as on Ctrl-C, and exits 128 + the signal."""
    import signal

    import nic.train as training

    def stopped(opts, *args, **kwargs):
        opts.out.mkdir(parents=True)
        if opts.out.name == "run":  # stopped after its first checkpoint
            (opts.out / training.CHECKPOINT_NAME).write_bytes(b"saved")
        raise training.Stopped(signal.SIGTERM)

    monkeypatch.setattr(training, "train", stopped)
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "run"), "--steps", "1", *TINY])
    assert result.exit_code == 143 and "checkpoint saved" in result.output
    # Stopped before any checkpoint: said so, and the run folder it made is gone.
    result = CliRunner().invoke(cli, ["train", str(photos), "--out", str(tmp_path / "early" / "run1"), "--steps", "1",
                                      *TINY])
    assert result.exit_code == 143 and "nothing saved" in result.output and not (tmp_path / "early").exists()
