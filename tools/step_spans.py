"""The hyperprior family's step spans for a weights file, measured on a folder of photos.

    python tools/step_spans.py ../shared/data/train --every 31 [--weights W] [-j 2]

A quality between two trained ones, n − 1 < q < n, codes with quality n's networks and a
step Δ = 2**(span·(n − q)) (nic.hyperprior.step_for). The span of an interval is the one
at which quality n's networks give quality n − 1's file size (the geometric mean of the
size ratios over the photos is 1), so that the size grows on through every trained
quality. Per interval: sizes at two spans, a line through their log ratios, and one more
point at its root to refine it. Prints each interval's ratios and the table to paste
into nic.hyperprior.STEP_SPANS. Measure on photos nic is not benchmarked on (not Kodak).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from nic import api, engine, hyperprior  # noqa: E402
from nic.images import read_image_with_metadata  # noqa: E402
from nic.weights import default_weights  # noqa: E402

NEAR = 1e-4
"""q = n − 1 + NEAR: the quality just above n − 1, whose Δ is the span's whole step."""


def log_ratio(images: list[np.ndarray], below: np.ndarray, n: int, span: float, spans: list[float],
              digest: str, weights: str | None) -> float:
    """Mean log(size with quality n's networks at ``span`` / quality n − 1's size)."""
    trial = list(spans)
    trial[n - 2] = span
    hyperprior.STEP_SPANS[digest] = tuple(trial)  # the table under measurement
    sizes = np.array([len(api.encode_pixels(x, n - 1 + NEAR, weights, family="hyperprior")) for x in images])
    return float(np.mean(np.log(sizes / below)))


def secant(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The span where the line through two (span, log ratio) points crosses 0 (the
    ratio falls as the span grows), kept within 0.2..2."""
    (s0, r0), (s1, r1) = a, b
    return float(np.clip(s0 - r0 * (s1 - s0) / (r1 - r0), 0.2, 2.0)) if r1 != r0 else s0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--weights", default=None, help="hyperprior weights [default: the installed ones]")
    parser.add_argument("--every", type=int, default=1, help="every Nth image of the folder (sorted by name)")
    parser.add_argument("-j", "--threads", type=int, default=2)
    args = parser.parse_args()
    engine.set_threads(args.threads)
    model, digest = default_weights(args.weights, "hyperprior", coding=True)
    digest = digest.hex()
    paths = sorted(p for p in args.folder.iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".ppm"))[::args.every]
    images = [read_image_with_metadata(p.read_bytes())[0] for p in paths]
    spans = [hyperprior.STEP_SPAN] * (model.qualities - 1)
    print(f"weights {digest}, {len(images)} images of {args.folder}")
    for n in range(2, model.qualities + 1):
        below = np.array([len(api.encode_pixels(x, n - 1, args.weights, family="hyperprior")) for x in images])
        points = [(s, log_ratio(images, below, n, s, spans, digest, args.weights)) for s in (0.5, 0.8)]
        root = secant(*points)
        points.append((root, log_ratio(images, below, n, root, spans, digest, args.weights)))
        nearer = min(points[:2], key=lambda p: abs(p[1]))
        spans[n - 2] = round(secant(nearer, points[2]), 2)
        print(f"({n - 1}, {n}): " + ", ".join(f"span {s:.2f} ratio {np.exp(r):.3f}" for s, r in points)
              + f" -> {spans[n - 2]:.2f}", flush=True)
    print(f'    "{digest}": ({", ".join(f"{s:.2f}" for s in spans)}),')


if __name__ == "__main__":
    main()
