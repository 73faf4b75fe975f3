"""Trellis-coded quantization against rounding, at one quality of the hyperprior family.

Prints, for rounding and for each trellis setting, the mean bpp and PSNR of the images
at three quantization steps around the quality's own (Δ = ratio**−n, ratio the scale
table's, n given by --steps), and the BD-rate of each curve against rounding's. The
trellis weighs a latent's squared error (units of y) by ``weight`` × κ × its channel's
g_s impulse energy (nic.quantization.impulse_energy) against its exact bits; a huge
weight leaves distortion alone. Bytes are whole substreams plus 70 for the container.

    python tools/tcq_table.py ../shared/data/kodak -q 4 --every 4 --trellis 1e6 30 3

Needs torch (the impulse energies). Not a codec path: files never carry TCQ (see
docs/quantization.md, "Trellis-coded quantization").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nic import engine, hyperprior  # noqa: E402
from nic.bench import bd_rate  # noqa: E402
from nic.coding import SCALE_COUNT, SCALE_MAX, SCALE_MIN  # noqa: E402
from nic.images import read_image  # noqa: E402
from nic.weights import default_weights  # noqa: E402

RATIO = (SCALE_MAX / SCALE_MIN) ** (1 / (SCALE_COUNT - 1))


def step_of(n: int) -> tuple[int, int]:
    """(Δ·256, table shift) of Δ = RATIO**−n: tables exactly n entries wider."""
    return int(round(256 * RATIO ** (-n))), -n


def point(model, pixels: np.ndarray, quality: int, n: int, weight: np.ndarray | None) -> tuple[float, float, float, float]:
    """(bpp, PSNR, encode s, decode s) of one image at one step, rounded or trellis-coded."""
    height, width = pixels.shape[:2]
    step = step_of(n)
    start = time.perf_counter()
    substreams = hyperprior.compress(model, pixels, quality, step=step, tcq=weight)
    encode = time.perf_counter() - start
    rows: list[np.ndarray] = []
    start = time.perf_counter()
    hyperprior.decompress(model, quality, height, width, pixels.shape[2] == 1, substreams, rows.append, step=step,
                          tcq=weight is not None)
    decode = time.perf_counter() - start
    error = np.mean((np.concatenate(rows).astype(np.float64) - pixels) ** 2)
    bits = 8 * (sum(len(s.data) for s in substreams) + 70)
    return bits / (height * width), 10 * np.log10(255**2 / error), encode, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("-q", "--quality", type=int, default=4)
    parser.add_argument("--every", type=int, default=1, help="every n-th image, in name order")
    parser.add_argument("--weights", default=None, help="hyperprior weights (default: the shipped ones)")
    parser.add_argument("--rounding-steps", default="-3,0,3", help="n of rounding's three steps")
    parser.add_argument("--steps", default="1,3,5", help="n of the trellis's steps")
    parser.add_argument("--trellis", type=float, nargs="+", default=[1e6, 30.0, 3.0],
                        help="distortion weights (× κ × impulse energy)")
    parser.add_argument("-j", "--threads", type=int, default=2)
    args = parser.parse_args()

    from nic.quantization import impulse_energy, kappa

    engine.set_threads(args.threads)
    model, digest = default_weights(args.weights, "hyperprior", coding=True)
    network = model.base.network()
    q = args.quality
    energy = impulse_energy(network, q).reshape(-1).numpy() * kappa(network, q, 3)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".ppm", ".jpg"))[::args.every]
    images = [read_image(f.read_bytes()) for f in files]
    settings = [("rounding", None, [int(n) for n in args.rounding_steps.split(",")])]
    settings += [(f"trellis, weight {w:g}", energy * w, [int(n) for n in args.steps.split(",")]) for w in args.trellis]
    print(f"weights {digest.hex()[:8]}, quality {q}, {len(images)} images, {args.threads} threads")
    print("| setting | n | bpp | PSNR (dB) | encode s | decode s |\n|---|---:|---:|---:|---:|---:|")
    curves = {}
    for name, weight, steps in settings:
        curve = []
        for n in steps:
            values = np.mean([point(model, x, q, n, weight) for x in images], axis=0)
            curve.append(values[:2])
            print(f"| {name} | {n} | {values[0]:.4f} | {values[1]:.3f} | {values[2]:.2f} | {values[3]:.2f} |", flush=True)
        curves[name] = np.array(curve)
    reference = curves["rounding"]
    print("\n| setting | BD-rate against rounding |\n|---|---:|")
    for name, curve in list(curves.items())[1:]:
        change = bd_rate(reference[:, 0], reference[:, 1], curve[:, 0], curve[:, 1])
        change = "no PSNR in common" if np.isnan(change) else f"{change:+.2f} %"
        print(f"| {name} | {change} |")


if __name__ == "__main__":
    main()
