"""Train the hyperprior family's h_a, h_s and z densities on cached latents of frozen
transforms (the first step of issue 21's recipe), one quality at a time, then export.

    python tools/train_hyperprior.py ../shared/data/train --init weights/default.npz \
        --out runs/hyper --qualities 1-8 --crops 1200 --steps 2000

For each quality: ``--crops`` random crops (the training sampler of nic train: a random
downscale, then 384x384) go through that quality's g_a once and are cached as gained
latents (runs/hyper/latents-qQ.npy, float16); h_a/h_s/z density then train on them,
minimizing the bits of ẑ and of the residuals with uniform noise (the transforms do
not move; the rounded residuals' bits made z collapse, docs/hyperprior.md). h_s starts at a per-channel Gaussian fitted to the
latents (``Codec.start_from``). Each
quality's state is saved (runs/hyper/qQ.pt) as it finishes, so an interrupted run resumes
at the next quality; ``--export FILE`` writes a weights file once every quality is done.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nic import hyperprior  # noqa: E402
from nic.train import CropSampler, find_images, load_rgb  # noqa: E402
from nic.weights import load_weights, save_weights  # noqa: E402


def qualities(text: str) -> list[int]:
    if "-" in text:
        low, high = map(int, text.split("-"))
        return list(range(low, high + 1))
    return [int(q) for q in text.split(",")]


def cache_latents(base, quality: int, images: list[np.ndarray], crops: int, patch: int, seed: int,
                  synthetic: float = 0.0) -> np.ndarray:
    sampler = CropSampler(images, patch, random.Random(seed * 100 + quality), synthetic)
    out = []
    with torch.inference_mode():
        for start in range(0, crops, 8):
            x = sampler.batch(min(8, crops - start)).contiguous(memory_format=torch.channels_last)
            out.append(base.analysis(x, quality).float().numpy().astype(np.float16))
    return np.concatenate(out)


@torch.no_grad()
def held_out_bpp(model: hyperprior.Codec, quality: int, crops: torch.Tensor) -> tuple[float, float]:
    """(bpp, of which ẑ) of held-out crops: ŷ as coded (rounded residuals under the float
    h_s's μ and σ), ẑ by its density with uniform noise."""
    model.eval()
    z_total = y_total = 0.0
    for start in range(0, len(crops), 50):
        z_bits, y_bits, _ = model.latent_bits(crops[start:start + 50].float(), quality, rounded=True)
        z_total, y_total = z_total + float(z_bits.sum()), y_total + float(y_bits.sum())
    model.train()
    pixels = len(crops) * crops.shape[2] * crops.shape[3] * 256
    return (z_total + y_total) / pixels, z_total / pixels


def factorized_bpp(model: hyperprior.Codec, quality: int, crops: torch.Tensor) -> float:
    """What the factorized family's integer tables spend on the same crops, rounded."""
    from nic.quantization import TableRate

    rate = TableRate(model.base.tables[quality - 1])
    bits = sum(float(rate(torch.round(crop.float())).sum()) for crop in crops)
    return bits / (len(crops) * crops.shape[2] * crops.shape[3] * 256)


def held_out_split(latents: np.ndarray, holdout: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(crops to train on, the last ``holdout`` crops or None)."""
    data = torch.from_numpy(latents)
    return (data[:-holdout], data[-holdout:]) if holdout else (data, None)


def batches(data: torch.Tensor, optimizer, lr: float, steps: int, batch: int, generator):
    """(step, a batch of crops) for steps 1 … ``steps``: the learning rate set on a cosine
    from ``lr`` to ~0 first, then ``batch`` random crops, flipped left-right half the time."""
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.5 + 0.5 * math.cos(math.pi * step / steps)) + 1e-6
        y = data[generator.choice(len(data), batch, replace=False)].float()
        if generator.random() < 0.5:
            y = y.flip(-1)
        yield step, y


def train_quality(model: hyperprior.Codec, quality: int, latents: np.ndarray, steps: int, batch: int,
                  lr: float, seed: int, log, fresh: bool = True, holdout: int = 0, z_warmup: int = 0) -> None:
    hyper = model.hyper[quality - 1]
    Z = model.config.Z
    rows = slice((quality - 1) * Z, quality * Z)
    density = list(model.z_density.parameters())
    optimizer = torch.optim.Adam([{"params": hyper.parameters()}, {"params": density}], lr=lr)
    data, held = held_out_split(latents, holdout)
    if fresh:
        model.start_from(data[:200].float(), quality)
    if held is not None:
        log(f"q{quality} held out: the factorized family's tables spend {factorized_bpp(model, quality, held):.4f} bpp")
    start = time.time()
    pixels = latents.shape[2] * latents.shape[3] * 256
    for step, y in batches(data, optimizer, lr, steps, batch, np.random.default_rng(seed + quality)):
        z_bits, y_bits, _ = model.latent_bits(y, quality)
        # With --z-warmup, ẑ's bits count from 0 to fully over the first steps: h_s learns
        # to use z before z's rate can push it to nothing.
        z_weight = min(1.0, step / z_warmup) if z_warmup else 1.0
        loss = (z_weight * z_bits + y_bits).mean() / pixels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Only this quality's rows of the z density learn.
        for p in density:
            if p.grad is not None:
                keep = torch.zeros_like(p.grad)
                keep[rows] = p.grad[rows]
                p.grad = keep
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"q{quality} step {step}/{steps} bpp {loss.item():.4f} "
                f"(z {z_bits.mean().item() / pixels:.4f}) {time.time() - start:.0f}s")
        if held is not None and (step % 500 == 0 or step == steps):
            bpp, z_bpp = held_out_bpp(model, quality, held)
            log(f"q{quality} step {step} held out: {bpp:.4f} bpp (z {z_bpp:.4f})")


def train_context(model: hyperprior.Codec, quality: int, latents: np.ndarray, steps: int, batch: int, lr: float,
                  seed: int, log, holdout: int = 0) -> None:
    """The context networks of a quality (nic.context) on its cached latents, with h_a,
    h_s and the z density as they are (stage 1's): the rate of the rounded residuals,
    exactly what the coder spends, pass by pass. Their last layers start at zero, so
    training starts from stage 1's rate."""
    net = model.context[quality - 1]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in net.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    data, held = held_out_split(latents, holdout)
    if held is not None:
        log(f"q{quality} held out, stage 1: {held_out_bpp(model, quality, held)[0]:.4f} bpp")
    start = time.time()
    pixels = latents.shape[2] * latents.shape[3] * 256
    for step, y in batches(data, optimizer, lr, steps, batch, np.random.default_rng(seed + quality)):
        model.eval()  # ẑ rounded, as coded; the context networks have no train-time behaviour
        _, y_bits, _ = model.latent_bits(y, quality, rounded=True)
        loss = y_bits.mean() / pixels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"q{quality} context step {step}/{steps} ŷ bpp {loss.item():.4f} {time.time() - start:.0f}s")
        if held is not None and (step % 500 == 0 or step == steps):
            log(f"q{quality} context step {step} held out: {held_out_bpp(model, quality, held)[0]:.4f} bpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--init", type=Path, required=True, help="factorized weights whose transforms stay frozen")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--qualities", type=qualities, default=None)
    parser.add_argument("--crops", type=int, default=1200)
    parser.add_argument("--patch", type=int, default=384)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hyper-N", type=int, default=128)
    parser.add_argument("--Z", type=int, default=128)
    parser.add_argument("--distribution", choices=["gaussian", "laplace"], default="gaussian",
                        help="shape of the conditional (laplace: heavier tails)")
    parser.add_argument("--holdout", type=int, default=0,
                        help="keep the last N cached crops out of training and log their exact rate every 500 steps")
    parser.add_argument("--z-warmup", type=int, default=0,
                        help="count ẑ's bits from 0 to fully over this many first steps")
    parser.add_argument("--synthetic", type=float, default=0.0,
                        help="share of cached crops that are generated hard content (nic.hardset.random_crop: "
                             "text, line art, gratings, flat areas)")
    parser.add_argument("--more", action="store_true",
                        help="train qualities that are done for --steps more (a new cosine schedule)")
    parser.add_argument("--export", type=Path, help="write the weights file here once every quality is done")
    parser.add_argument("--ship", action="store_true",
                        help="with --export: the compact file nic ships (integer networks only, int8 context "
                             "and h_a kernels, the transforms left to the --init weights, which it names by hash)")
    parser.add_argument("--context-from", type=Path,
                        help="train context networks (--slices, --checkerboard) on this stage-1 run's qualities "
                             "(its qQ.pt and latent caches), which stay as they are")
    parser.add_argument("--slices", type=int, default=1, help="ŷ's channels in this many slices (nic.context)")
    parser.add_argument("--checkerboard", action="store_true", help="each slice in two phases, anchors first")
    parser.add_argument("--context-width", type=int, default=128)
    parser.add_argument("--context-kernel", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    base = load_weights(args.init)[0]
    model = hyperprior.Codec(base, hyperprior.Config(
        hyper_N=args.hyper_N, Z=args.Z, distribution=args.distribution, slices=args.slices,
        checkerboard=args.checkerboard, context_width=args.context_width,
        context_kernel=args.context_kernel)).train()
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "log.txt", "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if args.context_from and not model.config.has_context:
        raise SystemExit("--context-from trains context networks: give --slices 2 or more, or --checkerboard")
    todo = args.qualities or list(range(1, model.qualities + 1))
    images = None
    for q in todo:
        state_path = args.out / f"q{q}.pt"
        if state_path.exists() and not args.more:
            continue
        if args.context_from:
            # --more goes on from this run's state; otherwise the context starts fresh on stage 1's.
            source = state_path if state_path.exists() else args.context_from / f"q{q}.pt"
            state = torch.load(source, weights_only=True)
            if source != state_path and "context" in state:
                raise SystemExit(f"{source} has context networks already")
            model.load_quality_state(q, state)
            cache = args.out / f"latents-q{q}.npy"
            if not cache.exists():
                cache.symlink_to((args.context_from / f"latents-q{q}.npy").resolve())
            train_context(model, q, np.load(cache), args.steps, args.batch, args.lr, args.seed, log, args.holdout)
            torch.save(model.quality_state(q), state_path)
            continue
        cache = args.out / f"latents-q{q}.npy"
        if not cache.exists():
            if images is None:
                images = [load_rgb(p) for p in find_images(args.data, ["kodak", "kodim"])]
            started = time.time()
            np.save(cache, cache_latents(base, q, images, args.crops, args.patch, args.seed, args.synthetic))
            log(f"q{q}: cached {args.crops} crops in {time.time() - started:.0f}s")
        latents = np.load(cache)
        more = state_path.exists()
        if more:  # --more: go on from where this quality stopped
            model.load_quality_state(q, torch.load(state_path, weights_only=True))
        train_quality(model, q, latents, args.steps, args.batch, args.lr, args.seed, log, fresh=not more,
                      holdout=args.holdout, z_warmup=args.z_warmup)
        torch.save(model.quality_state(q), state_path)
    if args.export:
        export(model, args.out, args.export, ship=args.ship)


def export(model: hyperprior.Codec, out: Path, path: Path, ship: bool = False) -> None:
    """Every quality's state of the run into one weights file: stage 1's (qQ.pt) on the
    frozen transforms, or, where tools/joint_hyperprior.py trained a quality end to end
    (qQ-joint.pt), its own pair and gains too. The integer h_s of each quality is
    calibrated on 64 crops of its cached latents: the frozen g_a's, also for a quality
    trained end to end (they only set h_s's activation ranges, at their 0.9999 quantile).
    With ``ship``, the compact coding-only file (hyperprior_torch.to_arrays), beside which
    the --init weights must be installed."""
    from joint_hyperprior import joint_path, load_run_quality, with_own_pair

    missing = [q for q in range(1, model.qualities + 1) if not (out / f"q{q}.pt").exists()]
    if missing:
        raise SystemExit(f"cannot export: qualities {', '.join(map(str, missing))} are not trained yet")
    joint = [q for q in range(1, model.qualities + 1) if joint_path(out, q).exists()]
    if joint:
        base = model.base
        for q in joint:
            base = with_own_pair(base, q)
        model = hyperprior.Codec(base.build_all(), model.config)
    calibration = []
    for q in range(1, model.qualities + 1):
        load_run_quality(model, out, q)
        # The cache holds the frozen g_a's latents; for a quality trained end to end they
        # are near its own (fine-tuning moves g_a little), and they only set h_s's ranges.
        latents = np.load(out / f"latents-q{q}.npy", mmap_mode="r")
        calibration.append(torch.from_numpy(np.asarray(latents[:64]).astype(np.float32)))
    if ship and joint:
        raise SystemExit("cannot ship: qualities trained end to end have transforms of their own")
    model.export_tables(calibration, context_weight_max=hyperprior.NARROW_WEIGHT_MAX if ship else hyperprior.WEIGHT_MAX)
    digest = save_weights(hyperprior.to_arrays(model, half=True, separate_base=ship, coding_only=ship), path)
    print(f"wrote {path} ({digest.hex()})")


if __name__ == "__main__":
    main()
