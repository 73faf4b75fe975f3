"""Bytes, PSNR and encode time of the generated hard-content set (nic.hardset) at an
encoder effort, a line per image and quality: what `nic bench --hard` gives at effort 1,
for efforts 2..4 too.

    python tools/hard_effort.py --effort 2 -q 4 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nic import api, hardset  # noqa: E402
from nic.bench import psnr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--effort", type=int, default=2, choices=(1, 2, 3, 4))
    parser.add_argument("-q", "--quality", type=float, nargs="+", default=[4, 8])
    args = parser.parse_args()
    for name, make in hardset.IMAGES.items():
        image = make()
        for quality in args.quality:
            started = time.perf_counter()
            data = api.encode_pixels(image, quality, effort=args.effort)
            seconds = time.perf_counter() - started
            decoded = api.decode_pixels(data).pixels
            print(f"{name} q{quality:g} effort {args.effort}: {len(data)} B, {psnr(image, decoded):.2f} dB, "
                  f"{seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
