"""Training: R + λ·D on random crops of natural photographs.

One run trains the shared transforms of every quality: each sample of a batch draws a quality
(a shuffled cycle over 1..Q) and minimizes bpp + λ_q·255²·MSE for it. bf16 autocast
with channels_last tensors is the fastest setup on CPUs with AVX-512 bf16/AMX, and
10-25x the slowest on CPUs without them (AVX2 only), where fp32 is used instead
(:func:`bf16_is_fast`, docs/results/training.md); the densities and the loss stay in fp32.

Checkpoints (model, optimizer, step, elapsed time, RNG) are written atomically every
few minutes and resumed from. They hold optimizer state and are never shipped:
``nic export`` turns one into a weights file.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import math
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .layers import bf16_is_fast  # noqa: F401  (nic train's choice, also nic.train.bf16_is_fast)
from .factorized import MSE_LAMBDAS, Codec, Config, rate_distortion_loss, specialize, transform_pair

DENSITY_LR_SCALE = 5.0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".ppm"}


@dataclass
class TrainOptions:
    data: list[Path]
    out: Path
    N: int | None = None  # a new model's hidden channels (default: Config's 128); a resumed run's are its own
    M: int | None = None  # its latent channels (default: Config's 192)
    patch: int = 128
    batch: int = 8
    synthetic: float = 0.0  # share of crops that are generated hard content (nic.hardset.random_crop)
    lr: float = 2e-4
    lr_final: float = 1e-5
    minutes: float | None = 60.0
    steps: int | None = None
    qualities: list[int] | None = None  # default: all
    lambdas: list[float] | None = None  # a new model's λ per quality (default: MSE_LAMBDAS, 8 qualities)
    checkpoint_minutes: float = 5.0
    seed: int = 0
    bf16: bool | None = None  # bf16 autocast; None: where it is fast (bf16_is_fast)
    channels_last: bool = True
    compile: bool = False  # torch.compile the training network (1.14-1.25x here, docs/results/training.md)
    device: str = "cpu"
    init: Path | None = None  # weights (.npz) to start from
    finetune_decoder: bool = False
    mixed: bool = False  # g_s decodes round(y) (straight-through), the rate stays the noisy one
    finetune_effort: int = 1  # with finetune_decoder: the encoder effort whose latents g_s learns from
    specialize: bool = False  # give each trained quality its own g_a/g_s (from --init) and train only those
    own_N: int | None = None  # with specialize: widen those pairs to this many hidden channels
    log_every: int = 20
    holdout: int = 0  # training images set aside for validation
    validation: list[Path] = field(default_factory=list)  # folders (or files) validated on as well
    validate_minutes: float = 10.0
    exclude: list[str] = field(default_factory=lambda: ["kodak", "kodim"])


def checked_lambdas(lambdas: list[float] | None, init: Path | None, specialize: bool = False
                    ) -> tuple[float, ...]:
    """A new model's λ per quality, sorted (quality 1 the smallest; MSE_LAMBDAS when none
    are given). ValueError for values a model cannot have, and with ``init``, whose
    weights keep their own λ, unless ``specialize``: then ``lambdas`` are new λ for the
    specialized qualities, one each in the order of --quality, returned as given."""
    if not lambdas:
        return MSE_LAMBDAS
    if not all(0 < v < 1e6 for v in lambdas) or not len(set(lambdas)) == len(lambdas) <= 255:
        raise ValueError("--lambda takes 1..255 different values in (0, 1e6)")
    if specialize:
        return tuple(lambdas)
    if init is not None:
        raise ValueError("--lambda sets up a new model (or, with --specialize, retargets the specialized "
                         "qualities); --init weights keep their own λ")
    return tuple(sorted(lambdas))


def checked_own_N(own_N: int | None, specialize: bool) -> None:
    """ValueError for --own-N without --specialize (the pairs it widens)."""
    if own_N is not None and not specialize:
        raise ValueError("--own-N widens the pairs of --specialize: give both")


def find_images(folders: list[Path], exclude: list[str], purpose: str = "training") -> list[Path]:
    """Image files under the folders, recursively, sorted; names containing an
    excluded word (the Kodak benchmark) are refused loudly rather than skipped."""
    files = []
    for folder in folders:
        folder = Path(folder)
        candidates = [folder] if folder.is_file() else sorted(folder.rglob("*"))
        for path in candidates:
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                if any(word in path.parent.name.lower() for word in exclude):
                    raise ValueError(f"refusing to use {path} for {purpose}: it looks like the Kodak benchmark")
                files.append(path)
    if not files:
        raise ValueError(f"no {purpose} images found in " + ", ".join(map(str, folders)))
    return files


CHECKPOINT_NAME = "checkpoint.pt"
"""A run folder's checkpoint (resumed by the same command)."""


class Stopped(KeyboardInterrupt):
    """Training stopped by a signal (SIGTERM, SIGHUP), as Ctrl-C stops it, with the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def load_rgb(path: Path) -> np.ndarray:
    """A training image's RGB pixels; ValueError naming the file where Pillow cannot read it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None


class CropSampler:
    """Random crops of ``patch``² pixels, after a random downscale of the photo.

    Ballé et al. downscaled photos by a random factor before cropping, which
    removes JPEG blocking and sensor noise that would otherwise be learned. The
    factor is drawn from [max(0.5, patch/min side), 1]; crops are also flipped. A
    ``synthetic`` share of the crops is generated hard content instead
    (:func:`nic.hardset.random_crop`: text, line art, gratings, flat areas), at full
    resolution: what downscaled photos never show.
    """

    def __init__(self, images: list[np.ndarray], patch: int, rng: random.Random, synthetic: float = 0.0):
        self.images = [img for img in images if min(img.shape[:2]) >= patch]
        if not self.images:
            raise ValueError(f"no training image is at least {patch}x{patch}")
        if not 0.0 <= synthetic <= 1.0:
            raise ValueError(f"the synthetic share must be in 0..1, not {synthetic}")
        self.patch = patch
        self.rng = rng
        self.synthetic = synthetic
        self.generator = np.random.default_rng(rng.getrandbits(64)) if synthetic else None
        area = np.array([img.shape[0] * img.shape[1] for img in self.images], dtype=np.float64)
        self.weights = list(np.sqrt(area))  # big photos more often, small ones still seen

    def crop(self) -> torch.Tensor:
        if self.synthetic and self.rng.random() < self.synthetic:
            from .hardset import random_crop  # text, line art, gratings, flat areas (nic.hardset)

            pixels = random_crop(self.generator, self.patch)
            return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        img = self.rng.choices(self.images, weights=self.weights)[0]
        h, w = img.shape[:2]
        low = max(0.5, self.patch / min(h, w))
        scale = self.rng.uniform(low, 1.0)
        size = min(min(h, w), int(math.ceil(self.patch / scale)))
        top, left = self.rng.randint(0, h - size), self.rng.randint(0, w - size)
        x = torch.from_numpy(np.array(img[top : top + size, left : left + size]))  # a copy: the photo may be read-only
        x = x.permute(2, 0, 1).unsqueeze(0).float() / 255.0
        if size != self.patch:
            x = F.interpolate(x, size=(self.patch, self.patch), mode="bilinear", antialias=True, align_corners=False)
        if self.rng.random() < 0.5:
            x = x.flip(-1)
        if self.rng.random() < 0.5:
            x = x.flip(-2)
        return x.clamp(0.0, 1.0)

    def batch(self, size: int) -> torch.Tensor:
        return torch.cat([self.crop() for _ in range(size)])


def quality_cycle(qualities: list[int], rng: random.Random) -> Iterator[int]:
    while True:
        order = list(qualities)
        rng.shuffle(order)
        yield from order


def effort_latents(model: Codec, x: torch.Tensor, qualities: torch.Tensor, effort: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x rounded to 8 bits, the integer latents nic's encoder picks for it at ``effort``).

    Step 3 of Borzechowski et al.: the decoder learns from the latents the
    entropy-constrained search really sends, not from rounded ones. The search runs
    per crop through nic.quantization with the current g_s (what the encoder will use
    with these weights); its own backward passes must not touch the parameters' grads."""
    from .quantization import quantize

    pixels = (x.detach().float() * 255.0).round().clamp(0, 255).to(torch.uint8)
    learning = [p for p in model.parameters() if p.requires_grad]
    for param in learning:
        param.requires_grad_(False)
    try:
        latents = [torch.from_numpy(quantize(model, pixels[i].permute(1, 2, 0).contiguous().numpy(), int(q), effort))
                   for i, q in enumerate(qualities.tolist())]
    finally:
        for param in learning:
            param.requires_grad_(True)
    x8 = (pixels.float() / 255.0).contiguous(memory_format=torch.channels_last if x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format)
    return x8, torch.stack(latents).float()


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def split_holdout(files: list[Path], count: int) -> tuple[list[Path], list[Path]]:
    """(training files, validation files): every k-th file is held out, deterministically."""
    if count <= 0:
        return files, []
    if count >= len(files):
        raise ValueError(f"cannot hold out {count} of {len(files)} images")
    stride = len(files) // count
    held = set(range(stride // 2, len(files), stride)[:count])
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


@torch.no_grad()
def validate(model: Codec, images: list[np.ndarray], qualities: list[int]) -> list[dict]:
    """Real rate and PSNR per quality: integer tables, range coder, 8-bit output."""
    from .factorized import quantize_latents, reconstruct
    from .coding import LatentCoder
    from .container import HEADER_SIZE

    model.eval()
    model.export_tables()
    rows = []
    for quality in qualities:
        coder = LatentCoder(model.tables[quality - 1])
        bpps, psnrs = [], []
        for pixels in images:
            height, width = pixels.shape[:2]
            latents = quantize_latents(model, pixels, quality)
            payload = coder.encode(latents)
            decoded = reconstruct(model, coder.decode(payload, latents.shape), quality, height, width, False)
            mse = np.mean((decoded.astype(np.float64) - pixels) ** 2)
            bpps.append(8 * (len(payload) + HEADER_SIZE + 4) / (height * width))
            psnrs.append(10 * np.log10(255.0**2 / max(mse, 1e-10)))
        rows.append({"quality": quality, "bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs))})
    model.tables = None
    model.train()
    return rows


def train(opts: TrainOptions, report: Callable[[dict], None] | None = None,
          report_validation: Callable[[int, list[dict]], None] | None = None) -> Path:
    """Run (or resume) training; returns the checkpoint path.

    Under ``torchrun`` (WORLD_SIZE > 1) each process trains on its own crops with
    DistributedDataParallel (gloo on CPU, NCCL on CUDA); rank 0 alone logs, validates
    and writes checkpoints. ``opts.batch`` is the batch of each process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    device = opts.device
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
    leader = rank == 0
    ckpt_path = opts.out / CHECKPOINT_NAME
    rng = random.Random(opts.seed + rank)
    torch.manual_seed(opts.seed)  # the same initial weights on every rank

    lambdas = checked_lambdas(opts.lambdas, opts.init, opts.specialize)
    bf16 = bf16_is_fast(device) if opts.bf16 is None else opts.bf16
    if opts.finetune_effort != 1 and (not opts.finetune_decoder or world > 1 or opts.finetune_effort not in (2, 3, 4)):
        raise ValueError("--finetune-effort 2..4 needs --finetune-decoder and a single process")
    if opts.specialize and (opts.init is None or not opts.qualities or opts.finetune_decoder):
        raise ValueError("--specialize needs --init weights and --quality, and trains the whole pair: "
                         "fine-tune its decoder in a second run")
    checked_own_N(opts.own_N, opts.specialize)
    if opts.mixed and opts.finetune_decoder:
        raise ValueError("--mixed trains the whole codec; --finetune-decoder already decodes rounded latents")
    retarget = {}
    if opts.specialize and opts.lambdas:
        if len(opts.lambdas) != len(opts.qualities):
            raise ValueError("--specialize takes one --lambda per --quality, or none")
        retarget = dict(zip(opts.qualities, lambdas))
        lambdas = MSE_LAMBDAS  # the table comes from --init
    config = Config(N=opts.N or Config.N, M=opts.M or Config.M, lambdas=lambdas)
    model = Codec(config)
    state = None
    if ckpt_path.exists():
        state, model = load_checkpoint(ckpt_path)
        config = model.config
        if opts.lambdas and not retarget and config.lambdas != lambdas:
            raise ValueError(f"the checkpoint in {opts.out} was trained for λ {config.lambdas}, not {lambdas}")
        asked = {"N": opts.N, "M": opts.M}
        other = [f"--{k} {v}" for k, v in asked.items() if v is not None and v != getattr(config, k)]
        if other and opts.init is None:
            raise ValueError(f"the checkpoint in {opts.out} is a model of --N {config.N} --M {config.M}, "
                             f"not {' '.join(other)}: resume with its sizes, or train into another --out")
    elif opts.init is not None:
        from .weights import default_weights

        initial = default_weights(opts.init, "factorized")[0]  # this trainer is the factorized family's
        config = initial.config
        if opts.finetune_decoder:
            config = dataclasses.replace(config, decoder_finetuned=True)
        model = Codec(config)
        model.load_state_dict(initial.state_dict())
    qualities = opts.qualities or list(range(1, config.qualities + 1))
    if max(qualities) > config.qualities:
        raise ValueError(f"--quality {max(qualities)}: the model has qualities 1..{config.qualities}")
    if opts.specialize and state is None:
        model = specialize(model, qualities, lambdas=retarget,
                           widths={q: opts.own_N for q in qualities} if opts.own_N else None)
        config = model.config
    files, held_out = split_holdout(find_images(opts.data, opts.exclude), opts.holdout)
    if opts.validation:
        extra = find_images(opts.validation, opts.exclude, "validation")
        validated = {f.resolve() for f in extra}
        files = [f for f in files if f.resolve() not in validated]  # never train on what is validated
        if not files:
            raise ValueError("every training image is also a --validate image")
        held = {f.resolve() for f in held_out}
        held_out = held_out + [f for f in extra if f.resolve() not in held]  # each validated once
    opts.out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(opts.seed + 1000 * rank + (state["step"] if state else 0))  # noise differs per rank

    if opts.finetune_effort > 1:
        model.export_tables()  # the encoder's search measures rate with the integer tables
    # The pairs of transforms the trained qualities run through ("" = the shared pair): only
    # those may learn, or DistributedDataParallel would wait for gradients that never come.
    pairs = {f"q{q}" if q in config.specialized else "" for q in qualities}
    for name, param in model.named_parameters():
        pair = transform_pair(name)
        if opts.finetune_decoder:
            # Decoder fine-tuning (Borzechowski et al.): only g_s and the inverse gains learn.
            param.requires_grad = name == "inverse_gain" or (
                pair is not None and pair[1] == "g_s" and pair[0] in pairs)
        else:
            # The used pairs, the gains and the densities. With --specialize that leaves the
            # shared pair and the other qualities as they were (their rows of gain and density
            # get zero gradients, so Adam does not move them).
            param.requires_grad = pair is None or pair[0] in pairs
    params = [p for p in model.parameters() if p.requires_grad]
    # The densities are small and each sees few samples: they learn 5x faster.
    density_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("density.")]
    other_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("density.")]
    groups = [{"params": other_params, "lr_scale": 1.0}]
    if density_params:
        groups.append({"params": density_params, "lr_scale": DENSITY_LR_SCALE})
    optimizer = torch.optim.Adam(groups, lr=opts.lr)
    step, elapsed = 0, 0.0
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            step, elapsed = int(state["step"]), float(state["elapsed"])
            if world == 1:
                rng.setstate(_rng_state_from(state["rng"]))
                torch.set_rng_state(state["torch_rng"])
        except Exception as exc:  # a checkpoint of another program, or damaged
            raise ValueError(f"{ckpt_path}: cannot resume from it ({type(exc).__name__}: {exc})"[:300]) from None
    network = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    if opts.compile:
        # Fuses GDN's elementwise work and the density's; the first steps compile (~20 s
        # on 2 cores, counted in the time budget). The weights stay the module's own.
        network = torch.compile(network)

    images = [load_rgb(p) for p in files]
    validation_images = [load_rgb(p) for p in held_out] if leader else []
    sampler = CropSampler(images, opts.patch, rng, opts.synthetic)
    cycle = quality_cycle(qualities, rng)
    lambda_table = torch.tensor(config.lambdas, dtype=torch.float32, device=device)

    log_path = opts.out / "log.csv"
    val_path = opts.out / "validation.csv"
    if leader and state is not None:
        # Rows written after the checkpoint describe steps that will be redone: drop them.
        for path in (log_path, val_path):
            if path.exists():
                with open(path, newline="") as f:
                    rows = list(csv.reader(f))
                kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)
    log_file = val_file = None
    if leader:
        new_log = not log_path.exists()
        log_file = open(log_path, "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "elapsed_s", "loss", "bpp", "psnr", "lr", "kpx_per_s"])
        if validation_images:
            new_val = not val_path.exists()
            val_file = open(val_path, "a", newline="")
            val_log = csv.writer(val_file)
            if new_val:
                val_log.writerow(["step", "elapsed_s", "quality", "bpp", "psnr"])

    budget = opts.minutes * 60.0 if opts.minutes else None

    def lr_at(fraction: float) -> float:
        # Cosine from lr to lr_final over the budget (time or steps).
        fraction = min(max(fraction, 0.0), 1.0)
        return opts.lr_final + 0.5 * (opts.lr - opts.lr_final) * (1 + math.cos(math.pi * fraction))

    def save() -> None:
        if not leader:
            return
        save_atomic({
            "config": config.to_json(), "model": {k: v.contiguous() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
            "rng": _rng_state_to(rng.getstate()), "torch_rng": torch.get_rng_state(),
        }, ckpt_path)

    def run_validation() -> None:
        rows = validate(model, validation_images, qualities)
        for row in rows:
            val_log.writerow([step, round(elapsed, 1), row["quality"], round(row["bpp"], 4), round(row["psnr"], 3)])
        val_file.flush()
        if report_validation:
            report_validation(step, rows)

    # SIGTERM, and SIGHUP (the terminal or the ssh session closed) unless nohup ignores it.
    stopping = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]

    def stop_on_signal(signum, frame):
        for other in stopping:  # one stop: the checkpoint is being saved
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)  # a KeyboardInterrupt: the finally clause below saves a checkpoint

    previous_handlers = {s: signal.signal(s, stop_on_signal) for s in stopping}
    last_save = last_validation = time.monotonic()
    window_px, window_t = 0, 0.0
    sums, counted = np.zeros(3), 0
    model.train()
    completed = False
    try:
        with _compile_errors(opts.compile):
            while True:
                done = (opts.steps is not None and step >= opts.steps) or (budget is not None and elapsed >= budget)
                if world > 1:  # every rank must stop at the same step, or the others hang
                    flag = torch.tensor([float(done)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    done = bool(flag.item())
                if done:
                    completed = True
                    break
                fraction = step / opts.steps if opts.steps else elapsed / budget if budget else 0.0
                lr = lr_at(fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                t0 = time.monotonic()
                qualities_now = torch.tensor([next(cycle) for _ in range(opts.batch)], device=device)
                x = sampler.batch(opts.batch).to(device)
                if opts.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lambdas = lambda_table[qualities_now - 1]
                if opts.finetune_effort > 1:
                    x, y_hat = effort_latents(model, x, qualities_now, opts.finetune_effort)
                    with torch.no_grad():
                        bits = model.latent_bits(y_hat, qualities_now)  # logged only: the rate is fixed
                    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                        x_tilde = model.synthesize(y_hat, qualities_now)
                else:
                    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                        x_tilde, bits = network(x, qualities_now, hard=opts.finetune_decoder, mixed=opts.mixed)
                losses, bpp, mse = rate_distortion_loss(x, x_tilde, bits, lambdas)
                loss = losses.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # with hard latents the rate term has no gradient: distortion only
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                dt = time.monotonic() - t0
                if world > 1:  # one clock for all ranks, so the time budget ends everywhere at once
                    shared = torch.tensor([dt], device=device)
                    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
                    dt = float(shared.item())
                step += 1
                elapsed += dt
                window_px += x.shape[0] * x.shape[2] * x.shape[3] * world
                window_t += dt
                psnr = float((10 * torch.log10(1.0 / mse.detach().clamp_min(1e-10))).mean())
                sums += (loss.item(), bpp.mean().item(), psnr)
                counted += 1
                if leader and step % opts.log_every == 0:
                    mean = sums / counted
                    row = {"step": step, "elapsed_s": round(elapsed, 1),
                           "loss": round(mean[0], 4), "bpp": round(mean[1], 4), "psnr": round(mean[2], 3),
                           "lr": f"{lr:.2e}", "kpx_per_s": round(window_px / window_t / 1e3, 1)}
                    log.writerow(row.values())
                    log_file.flush()
                    if report:
                        report(row)
                    sums[:], counted = 0, 0
                    window_px, window_t = 0, 0.0
                if leader and time.monotonic() - last_save > opts.checkpoint_minutes * 60:
                    save()
                    last_save = time.monotonic()
                if leader and validation_images and time.monotonic() - last_validation > opts.validate_minutes * 60:
                    run_validation()
                    last_validation = time.monotonic()
    finally:
        save()
        if completed and leader and validation_images:
            run_validation()
        for handle in (log_file, val_file):
            if handle is not None:
                handle.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if world > 1:
            if completed:
                # Leave together (not after an error: the others may be inside another
                # collective, and torchrun stops them anyway).
                dist.barrier()
            # DDP's reducer keeps the gloo group alive past destroy_process_group(); freed
            # only at interpreter exit, its worker threads sometimes aborted the process
            # ("terminate called without an active exception"). Free it here, first.
            network = None
            gc.collect()
            dist.destroy_process_group()
    return ckpt_path


@contextmanager
def _compile_errors(active: bool) -> Iterator[None]:
    """torch.compile fails lazily, at the first step, with a page of text (no C++
    compiler, no Dynamo for this Python): make that a one-line ValueError."""
    try:
        yield
    except Exception as exc:
        if not active or not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"--compile failed ({type(exc).__name__}: {first}); train without --compile") from exc


def _rng_state_to(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def load_checkpoint(path: Path) -> tuple[dict, "Codec"]:
    """(the checkpoint's state, its model) of a training checkpoint, read without pickle's
    code (``weights_only``); ValueError naming the file for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = Codec(Config.from_json(state["config"]))
        model.load_state_dict(state["model"])
    except Exception as exc:  # torch, pickle, zip and the state's own errors: the file is not one
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a nic training checkpoint ({reason[:200]})") from None
    return state, model


def export_checkpoint(checkpoint: Path, output: Path, half: bool = False) -> bytes:
    """Weights file (with integer tables) from a training checkpoint; returns its hash."""
    from .factorized import is_conv_kernel, to_arrays
    from .weights import save_weights

    _, model = load_checkpoint(checkpoint)
    model.eval()
    if half:
        # Tables must describe the weights as shipped, so round first, then export.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_conv_kernel(name, param.ndim):
                    param.copy_(param.half().float())
    model.export_tables()
    return save_weights(to_arrays(model, half=half), output)
