#!/usr/bin/env python
"""What one mean and one scale per latent channel would spend on held-out cached latents,
for a Gaussian and for a Laplacian, against the factorized family's integer tables:
where a hyperprior's conditional starts before z says anything (docs/results/hyperprior.md).

    python tools/conditional_fit.py --run runs/hyper -q 3

The last ``--holdout`` cached crops of ``runs/hyper/latents-qQ.npy`` (tools/train_hyperprior.py),
rounded; per channel the best of a grid of scales and of three centres (0, median,
mean). Measurement only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nic.quantization import TableRate  # noqa: E402
from nic.weights import load_weights  # noqa: E402


def cdf(z: torch.Tensor, distribution: str) -> torch.Tensor:
    if distribution == "gaussian":
        return torch.special.ndtr(z)
    tail = 0.5 * torch.exp(-z.abs())
    return torch.where(z < 0, tail, 1.0 - tail)


def bits(k: torch.Tensor, centre: float, scale: float, distribution: str) -> float:
    p = cdf((k + 0.5 - centre) / scale, distribution) - cdf((k - 0.5 - centre) / scale, distribution)
    return float(-torch.log2(p.clamp_min(1e-9)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("-q", "--quality", type=int, required=True)
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--weights", default="weights/default.npz", help="the factorized weights cached from")
    args = parser.parse_args()
    cached = np.load(args.run / f"latents-q{args.quality}.npy", mmap_mode="r")
    y = torch.from_numpy(np.asarray(cached[-args.holdout:]).astype(np.float64))
    k = torch.round(y)
    pixels = y.shape[0] * y.shape[2] * y.shape[3] * 256
    rate = TableRate(load_weights(args.weights)[0].tables[args.quality - 1])
    factorized = sum(float(rate(crop).sum()) for crop in k) / pixels
    scales = np.exp(np.linspace(np.log(0.05), np.log(80.0), 40))
    totals = {"gaussian": 0.0, "laplace": 0.0}
    for c in range(k.shape[1]):
        values, symbols = y[:, c].reshape(-1), k[:, c].reshape(-1)
        centres = (0.0, float(values.median()), float(values.mean()))
        for distribution in totals:
            totals[distribution] += min(bits(symbols, m, s, distribution) for m in centres for s in scales)
    print(f"q{args.quality}, {args.holdout} held-out crops: factorized tables {factorized:.4f} bpp; "
          + "; ".join(f"per-channel {name} {total / pixels:.4f} ({100 * (total / pixels / factorized - 1):+.1f} %)"
                      for name, total in totals.items()))


if __name__ == "__main__":
    main()
