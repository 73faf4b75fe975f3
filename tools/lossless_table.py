"""nic's files of the hard set beside the lossless codecs a user would pick for them.

    python tools/lossless_table.py                 # every image of nic.hardset, nic at q4 and q8
    python tools/lossless_table.py -q 8 text-black screenshot
    python tools/lossless_table.py -e 1 -e 2 -e 4   # the dictionary coding at each effort's preset

For each generated image (nic.hardset) prints, in bits per pixel: the default's file at
each quality (with its PSNR, inf where lossless), Pillow's PNG (``optimize``), WebP's
lossless mode (``method=6``), and deflate (zlib level 9) of the raw pixels, and the
pixels family's two lossless codings alone: its scan (``pixels.trial`` at step 1) and its
dictionary coding (``pixels.dictionary_trial``, and at each ``-e`` effort as the encoder keeps it:
``pixels.stronger``), without nic's header. An all-gray image
goes to the others as one channel, as nic codes it (``api.is_gray``). docs/results/hard-content.md, sections 9 and 10.
Measurement only: nothing here is imported by nic.
"""

from __future__ import annotations

import argparse
import io
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nic import api, hardset, pixels  # noqa: E402


def pillow_bits(image: np.ndarray, fmt: str, **options) -> int:
    buffer = io.BytesIO()
    Image.fromarray(image if image.shape[2] == 3 else image[..., 0]).save(buffer, fmt, **options)
    return 8 * len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="names of nic.hardset images [default: all]")
    parser.add_argument("-q", "--quality", type=float, action="append", help="nic's quality (repeatable) [4, 8]")
    parser.add_argument("-e", "--effort", type=int, choices=range(1, 5), action="append",
                        help="the dictionary coding's effort (repeatable) [1]")
    opts = parser.parse_args()
    qualities = opts.quality or [4.0, 8.0]
    efforts = opts.effort or [1]
    names = opts.images or list(hardset.IMAGES)
    header = ([f"nic q{q:g} (dB)" for q in qualities]
              + ["PNG", "WebP lossless", "deflate", "scan, lossless"]
              + [f"dictionary, lossless, effort {e}" for e in efforts])
    print("| image | " + " | ".join(header) + " |")
    print("|---|" + "---:|" * len(header))
    for name in names:
        image = hardset.generate([name])[name]
        size = image.shape[0] * image.shape[1]
        plane = image[..., :1] if api.is_gray(image) else image
        cells = []
        for quality in qualities:
            data = api.encode_pixels(image, quality, precision="fp32")
            error = np.mean((api.decode_pixels(data, precision="fp32").pixels.astype(np.float64) - image) ** 2)
            psnr = "inf" if error == 0 else f"{10 * np.log10(255 ** 2 / error):.2f}"
            cells.append(f"{8 * len(data) / size:.3f} ({psnr})")
        cells += [f"{bits / size:.3f}" for bits in (
            pillow_bits(plane, "PNG", optimize=True), pillow_bits(plane, "WEBP", lossless=True, quality=100, method=6),
            8 * len(zlib.compress(plane.tobytes(), 9)), pixels.trial(plane, 1).bits(),
            *(pixels.stronger(pixels.dictionary_trial(plane), plane, e).bits() for e in efforts))]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
