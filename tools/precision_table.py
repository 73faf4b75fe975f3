#!/usr/bin/env python
"""fp32 against bf16 transforms (nic.precision): the tables of docs/speed.md, "bf16".

    python tools/precision_table.py speed KODAK [--model factorized] [-q 1,4,8] [-j 2]
    python tools/precision_table.py psnr KODAK      # PSNR of bf16 decoding less fp32's, same files
    python tools/precision_table.py bdrate KODAK    # BD-rate of the bf16 encoder against fp32's
    python tools/precision_table.py compressai KODAK  # nic against CompressAI's bmshj2018-factorized

``speed``: in-process (pixels in memory, no file I/O), ``nic.api.encode_pixels`` and
``decode_pixels`` per image, best of ``--repeat`` per image, mean over the images; the
process keeps freed memory as nic's CLI does with bf16 (nic.precision.keep_freed_memory;
the fp32 rows run with it too). ``psnr``: each image coded once by the fp32 encoder,
decoded in fp32 and in bf16; the mean over the images of the PSNR difference, per
quality. ``bdrate``: each image coded by the fp32 and the bf16 encoder, both decoded in
fp32; the BD-rate (nic.bench.bd_rate) of the bf16 curve against the fp32 one.

``compressai``: CompressAI's bmshj2018-factorized (the layer shape of nic's factorized
family: N=128, M=192, 5x5 GDN transforms) with random weights (speed does not depend on
them), its ``compress``/``decompress`` in the same process, on the same images, against
nic's factorized family at both precisions; CompressAI is a measuring dependency only:

    pip install --no-deps compressai==1.2.8 pytorch_msssim && pip install einops pandas scipy torch_geometric

(its package imports torchvision, which its models never use: the tool puts a stub in
its place). Measurement only: nothing here is imported by nic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as nic's CLI: nic.engine runs its own threads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nic import api, engine, precision  # noqa: E402
from nic.bench import bd_rate, psnr  # noqa: E402
from nic.images import read_image  # noqa: E402


def images(folder: Path, limit: int | None) -> list[tuple[str, np.ndarray]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".ppm"))[:limit]
    return [(p.name, read_image(p.read_bytes())) for p in paths]


def best_of(repeat: int, work) -> tuple[float, object]:
    """(fewest seconds of ``repeat`` runs, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result


def cmd_speed(args, photos) -> None:
    print(f"in-process, {engine.threads()} threads, {len(photos)} images, family {args.model or 'default'}, "
          f"best of {args.repeat} per image; CPU bf16 units: {'yes' if precision.bf16_units() else 'no'}")
    print(f"{'quality':>7} | {'fp32 encode':>11} {'bf16 encode':>11} | {'fp32 decode':>11} {'bf16 decode':>11} (ms)")
    for q in args.qualities:
        for chosen in ("fp32", "bf16"):
            api.decode_pixels(api.encode_pixels(photos[0][1], q, family=args.model, precision=chosen),
                              precision=chosen)  # warm-up: weights, tables, kernels
        times: dict[str, tuple[list, list]] = {"fp32": ([], []), "bf16": ([], [])}
        for _, pixels in photos:
            for chosen in ("fp32", "bf16"):  # side by side, image by image: the machine's speed drifts
                seconds, data = best_of(args.repeat, lambda: api.encode_pixels(pixels, q, family=args.model,
                                                                                 precision=chosen))
                times[chosen][0].append(seconds)
                times[chosen][1].append(best_of(args.repeat, lambda: api.decode_pixels(data, precision=chosen))[0])
        means = {key: (statistics.mean(enc) * 1e3, statistics.mean(dec) * 1e3) for key, (enc, dec) in times.items()}
        print(f"{q:>7} | {means['fp32'][0]:11.1f} {means['bf16'][0]:11.1f} | "
              f"{means['fp32'][1]:11.1f} {means['bf16'][1]:11.1f}", flush=True)


def cmd_psnr(args, photos) -> None:
    print(f"PSNR of bf16 decoding less fp32 decoding, the same files (fp32 encoder), family "
          f"{args.model or 'default'}, {len(photos)} images")
    print(f"{'quality':>7} {'mean dB':>9} {'worst image dB':>15} {'max pixel diff':>15}")
    for q in args.qualities:
        changes, worst = [], 0
        for _, pixels in photos:
            data = api.encode_pixels(pixels, q, family=args.model, precision="fp32")
            fp32 = api.decode_pixels(data, precision="fp32").pixels
            bf16 = api.decode_pixels(data, precision="bf16").pixels
            changes.append(psnr(pixels, bf16) - psnr(pixels, fp32))
            worst = max(worst, int(np.abs(fp32.astype(int) - bf16).max()))
        print(f"{q:>7} {statistics.mean(changes):+9.4f} {min(changes):+15.4f} {worst:15d}", flush=True)


def cmd_bdrate(args, photos) -> None:
    print(f"the bf16 encoder against the fp32 encoder (both decoded in fp32), family {args.model or 'default'}, "
          f"{len(photos)} images")
    curves = {"fp32": ([], []), "bf16": ([], [])}
    print(f"{'quality':>7} {'fp32 bpp':>9} {'dB':>7} {'bf16 bpp':>9} {'dB':>7}")
    for q in args.qualities:
        row = {}
        for chosen in ("fp32", "bf16"):
            bpp = quality = 0.0
            for _, pixels in photos:
                data = api.encode_pixels(pixels, q, family=args.model, precision=chosen)
                bpp += 8 * len(data) / (pixels.shape[0] * pixels.shape[1])
                quality += psnr(pixels, api.decode_pixels(data, precision="fp32").pixels)
            row[chosen] = (bpp / len(photos), quality / len(photos))
            curves[chosen][0].append(row[chosen][0])
            curves[chosen][1].append(row[chosen][1])
        print(f"{q:>7} {row['fp32'][0]:9.4f} {row['fp32'][1]:7.3f} {row['bf16'][0]:9.4f} {row['bf16'][1]:7.3f}",
              flush=True)
    if len(args.qualities) > 1:
        change = bd_rate(*curves["fp32"], *curves["bf16"])
        print(f"BD-rate of the bf16 encoder against fp32's: {change:+.3f} %")


def compressai_model():
    """CompressAI's bmshj2018-factorized (N=128, M=192), random weights, its tables updated."""
    if "torchvision" not in sys.modules:  # imported by the package, never used by its models
        stub = types.ModuleType("torchvision")
        for part in ("transforms", "ops"):
            setattr(stub, part, types.ModuleType(f"torchvision.{part}"))
            sys.modules[f"torchvision.{part}"] = getattr(stub, part)
        sys.modules["torchvision"] = stub
    from compressai.models import FactorizedPrior

    model = FactorizedPrior(128, 192).eval()
    model.update(force=True)
    return model


def cmd_compressai(args, photos) -> None:
    import torch

    torch.set_num_threads(engine.threads())
    theirs = compressai_model()
    print(f"in-process, {engine.threads()} threads, {len(photos)} images, best of {args.repeat} per image "
          f"(ms per image; CompressAI {__import__('compressai').__version__}, fp32, its own range coder)")

    def compressai_times(pixels):
        x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).unsqueeze(0).float() / 255
        with torch.inference_mode():
            enc, out = best_of(args.repeat, lambda: theirs.compress(x))
            dec, _ = best_of(args.repeat, lambda: theirs.decompress(out["strings"], out["shape"]))
        return enc, dec

    rows = {"CompressAI bmshj2018-factorized": compressai_times}
    for chosen in ("fp32", "bf16"):
        def nic_times(pixels, chosen=chosen):
            enc, data = best_of(args.repeat, lambda: api.encode_pixels(pixels, args.qualities[0], family="factorized",
                                                                        precision=chosen))
            dec, _ = best_of(args.repeat, lambda: api.decode_pixels(data, precision=chosen))
            return enc, dec
        rows[f"nic factorized, {chosen}"] = nic_times
    for times in rows.values():
        times(photos[0][1])  # warm-up
    pairs: dict[str, list] = {name: [] for name in rows}
    for _, pixels in photos:  # side by side, image by image: the machine's speed drifts
        for name, times in rows.items():
            pairs[name].append(times(pixels))
    results = {name: tuple(statistics.mean(p[i] for p in pairs[name]) * 1e3 for i in (0, 1)) for name in rows}
    reference = results["CompressAI bmshj2018-factorized"]
    print(f"{'':34} {'encode':>8} {'decode':>8} {'x faster (enc / dec)':>22}")
    for name, (enc, dec) in results.items():
        print(f"{name:34} {enc:8.1f} {dec:8.1f} {reference[0] / enc:10.2f} / {reference[1] / dec:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["speed", "psnr", "bdrate", "compressai"])
    parser.add_argument("folder", type=Path, help="images, e.g. ../shared/data/kodak")
    parser.add_argument("--model", default=None, help="model family [default: the default's choice]")
    parser.add_argument("-q", "--qualities", default="1,2,3,4,5,6,7,8")
    parser.add_argument("-j", "--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    args = parser.parse_args()
    args.qualities = [int(q) for q in args.qualities.split(",")]
    if not precision.bf16_units():
        print("note: this CPU has no bf16 units: bf16 is emulated, and slow", file=sys.stderr)
    engine.set_threads(args.threads)
    precision.keep_freed_memory()
    import torch  # noqa: F401  (loaded before any timing; every call here names its precision)

    photos = images(args.folder, args.limit)
    {"speed": cmd_speed, "psnr": cmd_psnr, "bdrate": cmd_bdrate, "compressai": cmd_compressai}[args.command](
        args, photos)


if __name__ == "__main__":
    main()
