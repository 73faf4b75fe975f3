"""BD-rate of the shipped line of weights against the CPU time that made them.

    python tools/bd_curve.py [--reference bmshj2018-factorized] [--results docs/results]
    python tools/bd_curve.py --family hyperprior [--reference jpeg2000]

Reads the `nic bench` reports in docs/results (kodak-<hash>.json, and kodak.json for the
shipped weights) of every weights file the shipped ones descend from, in training order,
and prints a markdown table: training minutes (2-core CPU, all runs that went into the
weights, docs/results/training.md), BD-rate against the reference, and, at the end of each
cycle (a warm restart with its decoder fine-tuning, or a round of specialization), the
change per CPU-hour over that cycle. This is the curve that says whether more CPU time
still moves BD-rate. Then, for the shipped weights, each quality's PSNR gap to the
reference curve at nic's bpp (pchip of PSNR over log bpp, as BD-PSNR; a point past the
reference's bpp range is compared with its end point, marked, not extrapolated): where
the gap is widest is where to look next.

``--family hyperprior`` prints the hyperprior family's line instead: its weights files in
the order they were made, the CPU-hours (core-hours: a job on both cores for an hour is
two) spent on the family since the factorized transforms it starts from, and the BD-rate
against ``--reference`` (default: JPEG 2000, issue 21's target) of each file's own
`nic bench` report (docs/results/hyperprior.md gives the runs; its CPU-hours include the
runs that did not ship). Its gaps are those of the last file's report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# (weights hash, training minutes, what was added, ends a cycle): the shipped line, oldest first.
LINE = [
    ("759f234d", 120.0, "run 1, from scratch", True),
    ("827f76e1", 220.0, "run 2, warm restart", False),
    ("55d86db7", 230.0, "decoder fine-tuning", True),
    ("30cc7a66", 345.0, "run 4, warm restart, + Debian photos", False),
    ("62398322", 355.0, "decoder fine-tuning", True),
    ("3f2851de", 460.0, "run 6, warm restart", False),
    ("1b7f82d2", 470.0, "decoder fine-tuning", True),
    ("137a95ac", 600.0, "run 8, warm restart", False),
    ("120b5110", 610.0, "decoder fine-tuning", True),
    ("d55e9685", 672.5, "q1-q5 specialized, 10 min each + decoders", False),
    ("6cbf82f6", 697.5, "q8 specialized, q1 moved to λ 0.0011", True),
    ("3df04a13", 782.5, "q1-q5 trained 85 min longer (shipped)", True),
]

# The hyperprior family: (weights hash, CPU-hours since the factorized transforms, what was added).
HYPERPRIOR_LINE = [
    ("3df04a13", 0.0, "the factorized family it starts from"),
    ("4f3afde4", 2.2, "stage 1: h_a, h_s, z density on frozen transforms"),
    ("53082465", 5.2, "context networks, 3x3, every quality (shipped)"),
    ("f77d9120", 7.2, "q4 end to end (shipped)"),
    ("3148e4ae", 11.0, "q7, q8 end to end (shipped)"),
    ("5e131eae", 15.2, "q6 end to end (shipped); q2, q3 tried, not shipped"),
    ("4a9658ae", 18.7, "q3, q5 end to end (shipped)"),
]


def bd_rate(report: Path, reference: str) -> float:
    data = json.loads(report.read_text())
    return float(data["bd_rate"]["against"][reference]["bd_rate_percent"])


def report_for(results: Path, short_hash: str) -> Path:
    path = results / f"kodak-{short_hash}.json"
    if path.exists():
        return path
    shipped = results / "kodak.json"
    if str(json.loads(shipped.read_text())["weights"]).startswith(short_hash):
        return shipped
    raise SystemExit(f"bd_curve: no bench report for weights {short_hash} in {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["factorized", "hyperprior"], default="factorized")
    parser.add_argument("--reference", default=None,
                        help="codec or anchor [default: bmshj2018-factorized; jpeg2000 with --family hyperprior]")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "results")
    args = parser.parse_args()
    if args.family == "hyperprior":
        print_hyperprior_line(args.results, args.reference or "jpeg2000")
        return
    args.reference = args.reference or "bmshj2018-factorized"
    print(f"| weights | training minutes | added | BD-rate vs {args.reference} | cycle's change per CPU-hour |")
    print("|---|---:|---|---:|---:|")
    cycle_start = None  # (minutes, BD-rate) where the current cycle started
    for short_hash, minutes, what, ends_cycle in LINE:
        value = bd_rate(report_for(args.results, short_hash), args.reference)
        rate = ""
        if ends_cycle and cycle_start is not None:
            rate = f"{(value - cycle_start[1]) / (minutes - cycle_start[0]) * 60:+.1f} points"
        print(f"| `{short_hash}` | {minutes:g} | {what} | {value:+.1f} % | {rate} |")
        if ends_cycle:
            cycle_start = (minutes, value)
    print()
    print_gaps(json.loads((args.results / "kodak.json").read_text()), args.reference)


def print_hyperprior_line(results: Path, reference: str) -> None:
    """The hyperprior family's line: CPU-hours, BD-rate, and the change per CPU-hour since the row before."""
    print(f"| weights | CPU-hours | added | BD-rate vs {reference} | change per CPU-hour |")
    print("|---|---:|---|---:|---:|")
    before = None
    for short_hash, hours, what in HYPERPRIOR_LINE:
        value = bd_rate(report_for(results, short_hash), reference)
        rate = "" if before is None else f"{(value - before[1]) / (hours - before[0]):+.2f} points"
        print(f"| `{short_hash}` | {hours:g} | {what} | {value:+.1f} % | {rate} |")
        before = (hours, value)
    print()
    print_gaps(json.loads(report_for(results, HYPERPRIOR_LINE[-1][0]).read_text()), reference)


def print_gaps(report: dict, reference: str) -> None:
    """Per quality of a report's nic: PSNR minus the reference's (an anchor, or a codec of the
    same run) PSNR at the same bpp, on the reference's pchip of PSNR over log bpp
    (nic.bench's, as BD-PSNR uses it). A point past either end of the reference is
    compared with that end point, and says so."""
    from nic.bench import hermite_eval, pchip_slopes

    anchors = report["anchors"]["anchors"]
    if reference in anchors:
        anchor = anchors[reference]
    else:  # a codec measured in the same run
        points = [p["mean"] for p in report["codecs"][reference]["points"]]
        anchor = {"bpp": [p["bpp"] for p in points], "psnr": [p["psnr"] for p in points]}
    order = np.argsort(anchor["bpp"])
    log_bpp = np.log(np.asarray(anchor["bpp"], dtype=float)[order])
    psnr = np.asarray(anchor["psnr"], dtype=float)[order]
    slopes = pchip_slopes(log_bpp, psnr)
    print(f"| quality | bpp | PSNR | {reference} PSNR at that bpp | gap |")
    print("|---|---:|---:|---:|---:|")
    for point in report["codecs"]["nic"]["points"]:
        bpp, own = point["mean"]["bpp"], point["mean"]["psnr"]
        at = float(np.clip(np.log(bpp), log_bpp[0], log_bpp[-1]))
        theirs = float(hermite_eval(log_bpp, psnr, slopes, at))
        shown = f"{theirs:.3f}" if at == np.log(bpp) else f"{theirs:.3f} (its end point, {np.exp(at):.3f} bpp)"
        print(f"| {point['setting']} | {bpp:.4f} | {own:.3f} | {shown} | {own - theirs:+.2f} dB |")

if __name__ == "__main__":
    main()
