"""One quality of a hyperprior training run against the factorized family, on real files.

    python tools/hyperprior_quality.py ../shared/data/kodak --run runs/hyper -q 3

Takes quality Q's hyper-networks from ``RUN/qQ.pt`` (``tools/train_hyperprior.py``) on
the transforms of ``--init`` (default: the installed factorized weights), or Q's
end-to-end state ``RUN/qQ-joint.pt`` (``tools/joint_hyperprior.py``), integerizes its
h_s (activation ranges from 64 of the run's cached crops), and codes every image of the
folder with both families at quality Q: real substreams, decoded again, sizes with the
header, CRCs and substream directory. Prints mean bpp, PSNR and the rate change, the
bpp of a flat 768x512 image, and the median encode/decode time of the first image.
This measures a quality before every quality of a run is trained (``nic bench --weights``
measures an exported weights file).

A run that started from shipped hyperprior weights (``tools/joint_hyperprior.py`` without
stage-1 states) has only RUN/qQ-joint.pt: Q's networks are integerized alone
(:meth:`Codec.export_quality`, activation ranges from the run's held-out photos of
``--calibrate``), and the weights it started from are measured beside it.

    python tools/hyperprior_quality.py ../shared/data/kodak --run runs/joint4 -q 4 \
        --calibrate ../shared/data/train
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nic import factorized, hyperprior  # noqa: E402
from nic.bench import list_images, pareto_front, psnr, rate_change  # noqa: E402
from nic.container import HEADER_SIZE, SUBSTREAM_ENTRY  # noqa: E402
from nic.images import read_image  # noqa: E402
from nic.weights import default_weights  # noqa: E402
from joint_hyperprior import joint_path  # noqa: E402


def hyperprior_at(base, run: Path, quality: int, distribution: str = "gaussian") -> hyperprior.Codec:
    """Quality Q of a run on ``base``: stage 1's hyper-networks (RUN/qQ.pt), or, where
    tools/joint_hyperprior.py has trained it end to end (RUN/qQ-joint.pt), its own pair,
    gains and hyper-networks."""
    from joint_hyperprior import load_run_quality, with_own_pair

    if joint_path(run, quality).exists():  # a copy: the factorized family is measured with the shipped transforms
        base = with_own_pair(copy.deepcopy(base), quality)
    state = torch.load(run / f"q{quality}.pt", weights_only=True)
    # A state with context networks says their shape (train_hyperprior.py --slices, --checkerboard).
    config = hyperprior.Config.from_json(state["config"]) if "config" in state else \
        hyperprior.Config(distribution=distribution)
    model = hyperprior.Codec(base, config).eval()
    load_run_quality(model, run, quality)
    crops = np.load(run / f"latents-q{quality}.npy", mmap_mode="r")
    calibration = [torch.zeros(1, base.config.M, 4, 4)] * model.qualities
    calibration[quality - 1] = torch.from_numpy(np.asarray(crops[:64]).astype(np.float32))
    model.export_tables(calibration)
    return model


def joint_from_weights(run: Path, quality: int, weights: str | None, data: list[Path],
                       holdout: int) -> hyperprior.Codec:
    """Quality Q's end-to-end state of a run that started from hyperprior weights, Q
    integerized alone, calibrated on the run's held-out photos."""
    from joint_hyperprior import calibration_images, exported, joint_model

    model = joint_model(None, run, quality, weights=weights).eval()
    return exported(model, quality, calibration_images(data, holdout))


def extrapolated_change(rates: list[float], psnrs: list[float], rate: float, quality_db: float) -> float:
    """The rate change at the same PSNR of a point just beyond an end of the curve: log-rate
    linear in PSNR along the nearer end segment of the curve's Pareto points (as
    :func:`nic.bench.rate_change` takes them)."""
    front_rates, front_psnrs = pareto_front(rates, psnrs)
    end = slice(-2, None) if quality_db >= front_psnrs[-1] else slice(0, 2)
    (r0, r1), (p0, p1) = front_rates[end], front_psnrs[end]
    slope = (np.log(r1) - np.log(r0)) / (p1 - p0)
    return float(rate / np.exp(np.log(r1) + slope * (quality_db - p1)) - 1)


def file_bytes(substreams, version: int) -> int:
    directory = 0 if version == 1 else 4 + SUBSTREAM_ENTRY.size * len(substreams)
    return HEADER_SIZE + directory + sum(len(s.data) for s in substreams) + 4


def code(family, model, pixels: np.ndarray, quality: int) -> tuple[int, np.ndarray]:
    substreams = family.compress(model, pixels, quality)
    rows: list[np.ndarray] = []
    family.decompress(model, quality, pixels.shape[0], pixels.shape[1], pixels.shape[2] == 1, substreams,
                      rows.append)
    return file_bytes(substreams, family.FORMAT_VERSION), np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("-q", "--quality", type=int, required=True)
    parser.add_argument("--init", default=None, help="factorized weights [default: installed]")
    parser.add_argument("--distribution", choices=["gaussian", "laplace"], default="gaussian",
                        help="the conditional's shape the run was trained with")
    parser.add_argument("--weights", default=None,
                        help="the hyperprior weights a run without stage-1 states started from [default: installed]")
    parser.add_argument("--calibrate", type=Path, nargs="*", default=[],
                        help="the run's training data, for a run without stage-1 states")
    parser.add_argument("--holdout", type=int, default=16, help="as the run's")
    parser.add_argument("--curve", type=Path, default=None,
                        help="a `nic bench --json` file of the same folder: the run's point against its nic "
                             "curve (rate at the same PSNR)")
    args = parser.parse_args()
    q = args.quality
    base = default_weights(args.init, "factorized")[0]
    if (args.run / f"q{q}.pt").exists():
        model = hyperprior_at(base, args.run, q, args.distribution)
        families = (("factorized", factorized, base), ("hyperprior", hyperprior, model))
    else:
        model = joint_from_weights(args.run, q, args.weights, args.calibrate, args.holdout)
        started = default_weights(args.weights, "hyperprior")[0]
        families = (("factorized", factorized, base), ("start", hyperprior, started), ("hyperprior", hyperprior, model))
    if joint_path(args.run, q).exists():
        print(f"quality {q}: the end-to-end state {joint_path(args.run, q)}")
    results = {name: [] for name, _, _ in families}
    paths = list_images(args.folder)
    for path in paths:
        pixels = read_image(path.read_bytes())
        for name, family, m in families:
            size, decoded = code(family, m, pixels, q)
            results[name].append((8 * size / (pixels.shape[0] * pixels.shape[1]), psnr(pixels, decoded)))
    means = {name: np.mean(rows, axis=0) for name, rows in results.items()}
    print(f"quality {q}, {len(paths)} images of {args.folder}")
    print("| family | bpp | PSNR (dB) |\n|---|---:|---:|")
    for name, (bpp, quality_db) in means.items():
        print(f"| {name} | {bpp:.4f} | {quality_db:.2f} |")
    for against in ("factorized", "start")[: len(families) - 1]:
        print(f"rate change against {against}: {100 * (means['hyperprior'][0] / means[against][0] - 1):+.2f} % "
              f"(PSNR {means['hyperprior'][1] - means[against][1]:+.3f} dB)")
    if args.curve is not None:
        points = json.loads(args.curve.read_text())["codecs"]["nic"]["points"]
        rates, psnrs = [p["mean"]["bpp"] for p in points], [p["mean"]["psnr"] for p in points]
        change = rate_change(rates, psnrs, *means["hyperprior"])
        how = ""
        if np.isnan(change):  # beyond an end of the curve: its end segment's log-rate slope, extended
            change, how = extrapolated_change(rates, psnrs, *means["hyperprior"]), " (the end segment extended)"
        print(f"against the nic curve of {args.curve}: {100 * change:+.2f} % rate at the same PSNR{how}")
    flat = np.empty((512, 768, 3), np.uint8)
    flat[:] = (120, 160, 200)
    print("flat 768x512: " + ", ".join(f"{name} {8 * code(f, m, flat, q)[0] / flat[..., 0].size:.4f} bpp"
                                         for name, f, m in families))
    pixels = read_image(paths[0].read_bytes())
    for name, family, m in families:
        encode, decode = [], []
        for _ in range(4):
            start = time.perf_counter()
            substreams = family.compress(m, pixels, q)
            encode.append(time.perf_counter() - start)
            start = time.perf_counter()
            family.decompress(m, q, pixels.shape[0], pixels.shape[1], False, substreams, lambda rows: None)
            decode.append(time.perf_counter() - start)
        print(f"{name}: encode {1000 * statistics.median(encode[1:]):.0f} ms, "
              f"decode {1000 * statistics.median(decode[1:]):.0f} ms ({paths[0].name}, median of 3)")


if __name__ == "__main__":
    main()
