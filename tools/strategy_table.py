"""One shared model for 8 qualities, or one model per quality? Measured at equal CPU time.

    python tools/strategy_table.py ../shared/data/kodak --data ../shared/data/train \
        --data /work/debian-photos --init weights/default.npz --minutes 2.5 -q 1,2,6 \
        --out runs/strategy [-j 2] [--compile] [--json docs/results/strategy.json]

From the same starting weights (a shared model), two ways to spend 8 x MINUTES of CPU:

* shared: one run of all 8 qualities for 8 x MINUTES (what nic ships: one g_a/g_s,
  per-quality gains and densities);
* per quality: 8 runs of MINUTES each, one per quality (`nic train --quality Q`), each
  specializing the whole transform to its own λ, as if every quality were fine-tuned
  into its own model from a shared one (8 models to ship). Only the qualities given
  with -q are run: each costs MINUTES, and the others would cost the same.

Both use the same learning-rate schedule (cosine, --lr to --lr-final). Every model is
measured on FOLDER in process with `nic bench`'s round trip (real .nic bytes, mean bpp
and PSNR over images). Columns: J = bpp + λ·255²·MSE (the loss both minimize, mean
over images), and the rate change at equal PSNR against the shared run's curve (pchip
of log bpp over PSNR through its 8 points; negative: the per-quality model needs fewer
bits). Runs already exported in --out are reused, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from nic.bench import json_safe, list_images, parse_qualities, psnr, rate_change, round_trip
from nic.images import read_image
from nic.weights import default_weights


def train(name: str, out: Path, args: argparse.Namespace, minutes: float, quality: int | None) -> Path:
    """Weights (.npz, fp16 as shipped) of one run; trained and exported unless already there."""
    weights = out / f"{name}.npz"
    if weights.exists():
        return weights
    command = [sys.executable, "-m", "nic", "train", *map(str, args.data), "--out", str(out / name),
               "--init", str(args.init), "--minutes", str(minutes), "--lr", str(args.lr),
               "--lr-final", str(args.lr_final), "--seed", str(args.seed), "-j", str(args.threads)]
    if quality is not None:
        command += ["--quality", str(quality)]
    if args.compile:
        command.append("--compile")
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "nic", "export", str(out / name / "checkpoint.pt"),
                    "-o", str(weights), "--half"], check=True, stdout=subprocess.DEVNULL)
    return weights


def point(images: list[np.ndarray], weights: Path, quality: int, lam: float) -> dict:
    """Mean bpp, PSNR and J over the images, from real .nic files (nic bench's round trip)."""
    bpps, psnrs = [], []
    for pixels in images:
        data, decoded, _, _ = round_trip("nic", quality, pixels, str(weights))
        bpps.append(8.0 * len(data) / (pixels.shape[0] * pixels.shape[1]))
        psnrs.append(psnr(pixels, decoded))
    mse = np.mean([10 ** (-p / 10) for p in psnrs])  # per image, on [0, 1] pixels
    bpp = float(np.mean(bpps))
    return {"quality": quality, "bpp": bpp, "psnr": float(np.mean(psnrs)), "J": bpp + lam * 255.0**2 * float(mse)}


def percent(change: float) -> str:
    """A rate change as a signed percentage; outside the shared curve's PSNR range, a dash."""
    return "—" if np.isnan(change) else f"{100 * change:+.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="images to measure on (Kodak)")
    parser.add_argument("--data", type=Path, action="append", required=True, help="training folder (repeatable)")
    parser.add_argument("--init", type=Path, required=True, help="starting weights (.npz)")
    parser.add_argument("--minutes", type=float, default=4.0, help="CPU minutes of one per-quality run")
    parser.add_argument("-q", "--qualities", default="2,6", help="qualities to train one model each for")
    parser.add_argument("--out", type=Path, default=Path("runs/strategy"))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-final", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("-j", "--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = default_weights(str(args.init))
    lambdas = model.config.lambdas
    qualities = parse_qualities(args.qualities, model.config.qualities)
    paths = list_images(args.folder)
    if not paths:
        raise SystemExit(f"strategy_table: {args.folder}: no images")
    args.out.mkdir(parents=True, exist_ok=True)

    shared = train("shared", args.out, args, args.minutes * len(lambdas), None)
    specialized = {q: train(f"q{q}", args.out, args, args.minutes, q) for q in qualities}

    images = [read_image(p.read_bytes()) for p in paths]
    every = range(1, len(lambdas) + 1)
    start_curve = [point(images, args.init, q, lambdas[q - 1]) for q in every]
    shared_curve = [point(images, shared, q, lambdas[q - 1]) for q in every]
    shared_rates, shared_psnrs = [c["bpp"] for c in shared_curve], [c["psnr"] for c in shared_curve]
    rows = []
    for q in qualities:
        own = point(images, specialized[q], q, lambdas[q - 1])
        for label, p, minutes in (("start", start_curve[q - 1], 0.0),
                                  ("shared", shared_curve[q - 1], args.minutes * len(lambdas)),
                                  ("one per quality", own, args.minutes)):
            rows.append({"quality": q, "lambda": lambdas[q - 1], "model": label, "minutes": minutes, **p,
                         "rate_vs_shared": rate_change(shared_rates, shared_psnrs, p["bpp"], p["psnr"])})

    print(f"\n{len(images)} images of {args.folder}; from {args.init}; {args.minutes:g} min per quality, "
          f"{args.minutes * len(lambdas):g} min shared\n")
    print("| quality | λ | model | training min | bpp | PSNR (dB) | J | rate at equal PSNR vs shared |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['quality']} | {r['lambda']} | {r['model']} | {r['minutes']:g} | {r['bpp']:.4f} | "
              f"{r['psnr']:.3f} | {r['J']:.4f} | {percent(r['rate_vs_shared'])} |")
    if args.json:  # strict JSON: a rate change outside the shared curve is null
        Path(args.json).write_text(json.dumps(json_safe({
            "folder": str(args.folder), "images": [p.name for p in paths], "init": str(args.init),
            "minutes_per_quality": args.minutes, "start": start_curve, "shared": shared_curve,
            "rows": rows}), indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
