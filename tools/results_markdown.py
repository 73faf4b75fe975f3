"""The README's results tables, printed from a `nic bench --json` report.

    python tools/results_markdown.py docs/results/kodak.json

So the numbers in README.md are the JSON's, not retyped: nic's points (mean bpp, PSNR,
MS-SSIM and encode/decode time over the images), then the BD-rate of nic against every
reference in the report (negative: nic needs fewer bits for the same PSNR).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _number(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main(path: str) -> None:
    try:
        report = json.loads(Path(path).read_text())
        report["codecs"]["nic"], report["bd_rate"]["against"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"results_markdown: {path}: not a nic bench JSON report ({exc})") from None
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
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/results_markdown.py REPORT.json")
    main(sys.argv[1])
