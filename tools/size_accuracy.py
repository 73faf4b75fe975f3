"""How close `nic encode --size` / `--bpp` lands under its target, on a folder of images.

    python tools/size_accuracy.py ../shared/data/kodak --bpp 0.25 0.5 1.0 [--model hyperprior] [-j 2]
    python tools/size_accuracy.py ../shared/data/train --every 31     # a sample of a big folder

For each image and target (bits per pixel of the image, turned into a byte budget as
`nic encode --bpp` does), api.encode_to_target picks the quality; the table gives, per
target, the mean and the worst shortfall (1 − file bytes / budget: how much of the budget
went unused) and how many files came within 3 % under it, the way cwebp -size aims.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from nic import api, engine  # noqa: E402
from nic.images import read_image_with_metadata  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--bpp", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--model", default=None, help="model family [default: nic's default]")
    parser.add_argument("--weights", default=None)
    parser.add_argument("-j", "--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="every Nth image of the folder (sorted by name)")
    args = parser.parse_args()
    engine.set_threads(args.threads)
    paths = sorted(p for p in args.folder.iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".ppm"))[::args.every]
    print("| target bpp | images | mean shortfall | worst shortfall | within 3 % | mean quality |")
    print("|---:|---:|---:|---:|---:|---:|")
    for target in args.bpp:
        shortfalls, qualities = [], []
        for path in paths:
            pixels, _, _ = read_image_with_metadata(path.read_bytes())
            budget = int(target * pixels.shape[0] * pixels.shape[1] / 8)
            data, quality = api.encode_to_target(pixels, budget, args.weights, family=args.model)
            shortfalls.append(1 - len(data) / budget)
            qualities.append(quality)
        s = np.array(shortfalls)
        print(f"| {target:g} | {len(s)} | {100 * s.mean():.2f} % | {100 * s.max():.2f} % | "
              f"{int(((s >= 0) & (s <= 0.03)).sum())} of {len(s)} | {np.mean(qualities):.2f} |", flush=True)


if __name__ == "__main__":
    main()
