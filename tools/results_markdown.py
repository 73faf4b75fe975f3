"""The README's results tables, printed from a `nic bench --json` report.

    python tools/results_markdown.py docs/results/kodak.json
    python tools/results_markdown.py docs/results/kodak.json --per-quality BEFORE.json

So the numbers in README.md are the JSON's, not retyped: nic's points (mean bpp, PSNR,
MS-SSIM and encode/decode time over the images), then the BD-rate of nic against every
reference in the report (negative: nic needs fewer bits for the same PSNR). With
--per-quality, one table instead: each quality's point before and after, and the rate
change at equal PSNR against the before curve (pchip, as BD-rate; a dash outside its
PSNR range).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _number(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def load(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
        report["codecs"]["nic"]["points"], report["bd_rate"]["against"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"results_markdown: {path}: not a nic bench JSON report ({exc})") from None
    return report


def loss(point: dict) -> float:
    """J = bpp + λ·255²·MSE, the training loss, mean over the point's images, with the λ
    of nic's standard table (nic.factorized.MSE_LAMBDAS) for the point's quality."""
    from nic.factorized import MSE_LAMBDAS

    lam = MSE_LAMBDAS[int(point["param"]) - 1]
    return sum(i["bpp"] + lam * 255.0**2 * 10 ** (-i["psnr"] / 10) for i in point["images"]) / len(point["images"])


def per_quality(path: str, before_path: str) -> None:
    from nic.bench import rate_change

    after, before = load(path), load(before_path)
    old = {p["param"]: p for p in before["codecs"]["nic"]["points"]}
    curve = sorted((p["mean"] for p in old.values()), key=lambda m: m["bpp"])
    print(f"weights `{before['weights']}` → `{after['weights']}`, {len(after['images'])} images of "
          f"`{after['folder']}`; means over images; J with the standard λ of each quality.\n")
    print("| quality | bpp before | PSNR before | bpp after | PSNR after | J before → after | rate at equal PSNR |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for point in after["codecs"]["nic"]["points"]:
        new, was = point["mean"], old.get(point["param"])
        change = rate_change([m["bpp"] for m in curve], [m["psnr"] for m in curve], new["bpp"], new["psnr"])
        j = f"{loss(was):.4f} → {loss(point):.4f} ({100 * (loss(point) / loss(was) - 1):+.1f} %)" if was else "—"
        print(f"| {point['param']} | {_number(was and was['mean']['bpp'], 4)} | "
              f"{_number(was and was['mean']['psnr'], 3)} | {new['bpp']:.4f} | {new['psnr']:.3f} | {j} | "
              f"{'—' if math.isnan(change) else f'{100 * change:+.1f} %'} |")


def main(path: str) -> None:
    report = load(path)
    images = report["images"]
    effort = report.get("effort", 1)
    print(f"nic {report['nic_version']}, weights `{report['weights']}`, effort {effort}, "
          f"{len(images)} images of `{report['folder']}`; means over images.\n")
    print("| quality | bpp | PSNR (dB) | MS-SSIM | encode ms | decode ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for point in report["codecs"]["nic"]["points"]:
        mean = point["mean"]
        print(f"| {point['setting'].removeprefix('q=')} | {mean['bpp']:.3f} | {mean['psnr']:.2f} | "
              f"{_number(mean['ms_ssim'], 4)} | {mean['enc_ms']:.0f} | {mean['dec_ms']:.0f} |")
    print("\n| nic against | BD-rate | BD-PSNR |")
    print("|---|---:|---:|")
    for result in report["bd_rate"]["against"].values():
        rate = result["bd_rate_percent"]
        print(f"| {result['label']} | {'—' if rate is None else f'{rate:+.1f} %'} | "
              f"{_number(result['bd_psnr_db'], 2)} dB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="nic bench --json report")
    parser.add_argument("--per-quality", metavar="BEFORE", help="compare each quality with this earlier report")
    args = parser.parse_args()
    if args.per_quality:
        per_quality(args.report, args.per_quality)
    else:
        main(args.report)
