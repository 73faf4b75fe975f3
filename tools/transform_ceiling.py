"""How much PSNR the transforms leave to the entropy model: g_s(g_a(x)) with and without quantization.

    python tools/transform_ceiling.py ../shared/data/kodak
    python tools/transform_ceiling.py --hard text-black screenshot line-art -q 4 -q 8

For every quality of the hyperprior weights (``--weights``, default: the installed ones)
and every ``--every``-th image of the folder (or each generated image of the hard set
named by ``--hard``, nic.hardset), prints the mean PSNR of the 8-bit output
decoded from ŷ = round(y − μ) + μ (what the coder sends), of the output decoded from y
itself (no quantization at all: the ceiling of the pair at any rate), and the mean bpp of
ŷ as coded with the float h_s. Where the ceiling lies little above the coded PSNR, more
bits cannot buy much more quality: the pair's capacity (its latent width M, its hidden
width N, its training) is what limits that quality, not the entropy model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nic import hardset, hyperprior  # noqa: E402
from nic.bench import list_images  # noqa: E402
from nic.images import read_image  # noqa: E402
from nic.weights import default_weights  # noqa: E402
from joint_hyperprior import image_tensor, psnr_8bit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=None)
    parser.add_argument("--hard", nargs="+", default=None, metavar="NAME",
                        help="measure these images of nic.hardset, each on its own, instead of a folder")
    parser.add_argument("--weights", default=None, help="hyperprior weights [default: installed]")
    parser.add_argument("--every", type=int, default=2, metavar="N", help="measure every N-th image [default: 2]")
    parser.add_argument("-q", "--quality", type=int, action="append", default=None,
                        help="a quality to measure (repeat) [default: all]")
    args = parser.parse_args()
    if (args.folder is None) == (args.hard is None):
        parser.error("give a folder, or --hard NAME ... without one")
    if args.every < 1:
        parser.error("--every must be at least 1")
    if args.folder is not None and not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    try:
        if args.hard:
            sets = {name: [image_tensor(pixels)] for name, pixels in hardset.generate(args.hard).items()}
        else:
            sets = {f"{args.folder}": [image_tensor(read_image(path.read_bytes()))
                                       for path in list_images(args.folder)[::args.every]]}
    except (ValueError, OSError) as exc:  # an unknown hard-set name, an unreadable image
        parser.error(str(exc))

    weights, digest = default_weights(args.weights, "hyperprior")
    model = hyperprior.trainable_again(weights)
    model.base = model.base.build_all()
    model.eval()
    wrong = [q for q in args.quality or [] if not 1 <= q <= model.qualities]
    if wrong:
        parser.error(f"quality {wrong[0]} is not one of the weights' 1..{model.qualities}")
    print(f"weights {digest.hex()[:8]}")
    print("| images | quality | bpp | coded (dB) | ceiling (dB) | headroom (dB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, images in sets.items():
        label = f"{name} ({len(images)})" if len(images) > 1 else name
        for quality in args.quality or range(1, model.qualities + 1):
            bpp, coded, ceiling = measure(model, quality, images)
            print(f"| {label} | {quality} | {bpp:.4f} | {coded:.2f} | {ceiling:.2f} | {ceiling - coded:.2f} |",
                  flush=True)


@torch.no_grad()
def measure(model: hyperprior.Codec, quality: int, images: list[torch.Tensor]) -> tuple[float, float, float]:
    """Mean (bpp of ŷ and ẑ with the float h_s, PSNR decoded from ŷ, PSNR decoded from y)."""
    bpp, coded, ceiling = [], [], []
    for x in images:
        y = model.base.analysis(x, quality)
        z_bits, y_bits, y_hat = model.latent_bits(y, quality, rounded=True)
        bpp.append(float(z_bits.sum() + y_bits.sum()) / (x.shape[2] * x.shape[3]))
        coded.append(psnr_8bit(x, model.base.synthesis(y_hat, quality)))
        ceiling.append(psnr_8bit(x, model.base.synthesis(y, quality)))
    return float(np.mean(bpp)), float(np.mean(coded)), float(np.mean(ceiling))


if __name__ == "__main__":
    main()
