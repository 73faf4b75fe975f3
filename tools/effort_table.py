"""BD-rate and encode time of nic's encoder efforts and of other weights, on one folder.

    python tools/effort_table.py ../shared/data/kodak --efforts 1,2,3 -q 1,3,5,7 --limit 6 \
        [--weights W.npz] [--reference-weights R.npz] [--json OUT.json] [-j 2]

Every row is a (weights, effort) pair measured on the same images and qualities, in
process, by `nic bench`'s own measure() (real .nic bytes, PSNR over RGB of the 8-bit
decode, means over images per quality). BD-rate (pchip, nic.bench.bd_rate) of each row
is against the first row: the reference weights (default: the same weights) at effort 1.
The encode-time column is the mean encode time relative to that first row.
Prints a Markdown table (the one in docs/quantization.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nic.bench import bd_metrics, list_images, measure, parse_qualities
from nic.images import read_image
from nic.weights import default_weights


def measure_row(images: list[np.ndarray], qualities: list[int], weights: str | None, effort: int) -> dict:
    points = []
    for quality in qualities:
        records = [measure("nic", quality, pixels, weights, effort) for pixels in images]  # as nic bench does
        points.append({"quality": quality, "bpp": float(np.mean([r["bpp"] for r in records])),
                       "psnr": float(np.mean([r["psnr"] for r in records])),
                       "enc_s": float(np.mean([r["enc_ms"] for r in records])) / 1e3})
        print(f"  q{quality}: {points[-1]['bpp']:.4f} bpp {points[-1]['psnr']:.3f} dB "
              f"{points[-1]['enc_s']:.2f} s", flush=True)
    return {"weights": weights or "shipped", "effort": effort, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--efforts", default="1,2,3")
    parser.add_argument("-q", "--qualities", default="1,3,5,7")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--weights", default=None, help="weights to measure (default: shipped)")
    parser.add_argument("--reference-weights", default=None,
                        help="weights of the reference row at effort 1 (default: --weights)")
    parser.add_argument("--json", default=None)
    parser.add_argument("-j", "--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, digest = default_weights(args.weights)
    qualities = parse_qualities(args.qualities, model.qualities)
    if not args.folder.is_dir():
        raise SystemExit(f"effort_table: {args.folder}: not a folder")
    paths = list_images(args.folder)[: args.limit]
    if not paths:
        raise SystemExit(f"effort_table: {args.folder}: no images")
    images = [read_image(p.read_bytes()) for p in paths]
    efforts = [int(e) for e in args.efforts.split(",")]

    rows = []
    if args.reference_weights:
        print(f"reference weights {args.reference_weights}, effort 1", flush=True)
        rows.append(measure_row(images, qualities, args.reference_weights, 1))
    for effort in efforts:
        print(f"weights {args.weights or 'shipped'}, effort {effort}", flush=True)
        rows.append(measure_row(images, qualities, args.weights, effort))

    first = rows[0]
    ref_rates = [p["bpp"] for p in first["points"]]
    ref_psnrs = [p["psnr"] for p in first["points"]]
    ref_time = np.mean([p["enc_s"] for p in first["points"]])
    print(f"\n{len(images)} images of {args.folder}, qualities {','.join(map(str, qualities))}; "
          f"BD-rate against the first row\n")
    print("| weights | effort | BD-rate | BD-PSNR | encode time | s per image |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        metrics = bd_metrics(ref_rates, ref_psnrs, [p["bpp"] for p in row["points"]],
                             [p["psnr"] for p in row["points"]])
        seconds = float(np.mean([p["enc_s"] for p in row["points"]]))
        row.update(bd_rate_percent=metrics.bd_rate, bd_psnr_db=metrics.bd_psnr, time_ratio=seconds / ref_time)
        print(f"| {Path(row['weights']).name} | {row['effort']} | {metrics.bd_rate:+.2f} % | "
              f"{metrics.bd_psnr:+.3f} dB | {seconds / ref_time:.1f}x | {seconds:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "folder": str(args.folder), "images": [p.name for p in paths], "qualities": qualities,
            "threads": torch.get_num_threads(), "weights_hash": digest.hex(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
