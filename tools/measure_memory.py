#!/usr/bin/env python
"""Speed and peak memory of nic, by image size: the table of docs/speed.md.

    python tools/measure_memory.py --kodak ../shared/data/kodak 1 6 24 20000x20000
    python tools/measure_memory.py 1 6 24          # megapixels, 3:2 (24 → 6000x4000)
    python tools/measure_memory.py 1 --tile 512    # with nic.tiling.DEFAULT_TILE = 512
    python tools/measure_memory.py 1 --mallopt scoped   # with an allocator setting of docs/speed.md
    python tools/measure_memory.py 24 20000x20000  # the big one: minutes, and ~1 GB of PNG input

For each size a smooth synthetic photo-like image is written as PNG to a temporary
folder; then `nic encode IN.png -o X.nic` and `nic decode X.nic -o OUT.png` run as
subprocesses under `/usr/bin/time -v` (or, without it, with
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss). The numbers are of the whole
process: Python, torch, the PNG reading and writing (a strip at a time, nic.streaming),
the latents (in memory, or in a temporary file above nic.tiling.SPILL_BYTES), the
range coder and the transforms. With --kodak DIR, every image of DIR is also encoded
and decoded in this process, as `nic bench` times them (pixels in memory, one warm-up
image first), for the per-image milliseconds. At the end a Markdown table of all of it.
Measurement only: not part of nic.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TIME = "/usr/bin/time"


def synthetic_image(width: int, height: int, seed: int = 0, band: int = 256) -> np.ndarray:
    """uint8 (height, width, 3): smooth gradients, soft discs, fine stripes and mild
    noise; built in row bands so a large image needs no float copy of itself."""
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), dtype=np.uint8)
    xx = np.arange(width, dtype=np.float32)[None, :] / max(width, 1)
    discs = [(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25), rng.uniform(-60, 60)) for _ in range(6)]
    for r0 in range(0, height, band):
        r1 = min(height, r0 + band)
        yy = np.arange(r0, r1, dtype=np.float32)[:, None] / max(height, 1)
        aspect = width / max(height, 1)
        shade = np.zeros((r1 - r0, width), dtype=np.float32)
        for cy, cx, radius, level in discs:
            d2 = ((yy - cy) ** 2 + ((xx - cx) * aspect) ** 2) / radius**2
            shade += level * np.exp(-d2)
        stripes = 6 * np.sin((xx * width) * 0.35 + (yy * height) * 0.11)
        for c in range(3):
            base = 128 + 90 * np.sin(xx * 3.1 + c) * np.cos(yy * 2.3 - c)
            noise = rng.normal(0, 3, (r1 - r0, width)).astype(np.float32)
            out[r0:r1, :, c] = np.clip(base + shade + stripes + noise, 0, 255).astype(np.uint8)
    return out


def size_for(megapixels: float) -> tuple[int, int]:
    """3:2 landscape of about that many megapixels (24 → 6000x4000)."""
    k = max(1, int(round(math.sqrt(megapixels * 1e6 * 1.5) / 24)))
    return 24 * k, 16 * k


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) from '24' (megapixels, 3:2) or '20000x20000'."""
    try:
        if "x" in text:
            width, height = (int(v) for v in text.lower().split("x"))
        else:
            width, height = size_for(float(text))
    except ValueError:
        raise SystemExit(f"size {text!r} is neither megapixels nor WxH") from None
    if width < 1 or height < 1:
        raise SystemExit(f"size {text!r} has no pixels")
    return width, height


def run_measured(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one subprocess; raises on failure."""
    if os.path.exists(TIME):
        proc = subprocess.run([TIME, "-v", *command], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-2000:]}")
        rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
        seconds = 0.0
        for part in wall.split(":"):
            seconds = seconds * 60 + float(part)
        return rss_kib / 1024, seconds
    # Fallback: ru_maxrss of children is the max over all children so far, so run each
    # measurement in a fresh intermediate Python that reports its own children.
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, rc)")
    proc = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    rss_kib, seconds, rc = proc.stdout.split()[-3:]
    if int(rc) != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(command)}\n{proc.stderr[-2000:]}")
    return int(rss_kib) / 1024, float(seconds)


MALLOPT = {
    # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB for the whole process
    "global": "import ctypes; libc = ctypes.CDLL('libc.so.6'); libc.mallopt(-4, 0); libc.mallopt(-1, 1 << 30); ",
    # the same only while the tiled transforms run; then mmap back on and the heap trimmed
    "scoped": (
        "import ctypes, functools, nic.tiling; libc = ctypes.CDLL('libc.so.6')\n"
        "def scoped(f):\n"
        "    @functools.wraps(f)\n"
        "    def run(*a, **k):\n"
        "        libc.mallopt(-4, 0); libc.mallopt(-1, 1 << 30)\n"
        "        try:\n"
        "            return f(*a, **k)\n"
        "        finally:\n"
        "            libc.mallopt(-4, 65536); libc.mallopt(-1, 128 << 10); libc.malloc_trim(0)\n"
        "    return run\n"
        "nic.tiling.quantize_into = scoped(nic.tiling.quantize_into)\n"
        "nic.tiling.reconstruct_into = scoped(nic.tiling.reconstruct_into)\n"),
}
"""Allocator settings docs/speed.md discusses: glibc hands big freed blocks back to the
kernel, which must zero them again when the next tile asks (a page fault per 4 KiB);
these keep them in the heap for the next tile instead."""


def nic_command(tile: int | None, mallopt: str | None) -> list[str]:
    if tile is None and not mallopt:
        nic = shutil.which("nic") or str(Path(sys.executable).with_name("nic"))
        return [nic]
    code = MALLOPT[mallopt] if mallopt else ""
    code += "import sys\n"
    if tile is not None:
        code += f"import nic.tiling; nic.tiling.DEFAULT_TILE = {int(tile)}\n"
    code += "from nic.cli import main; sys.argv[0] = 'nic'; main()\n"
    return [sys.executable, "-c", code]


def kodak_speed(folder: Path, quality: int, threads: int | None) -> tuple[int, tuple[int, int], float, float]:
    """(images, (width, height) of the first, mean encode ms, mean decode ms), in process."""
    import torch

    from nic.bench import _read, list_images, round_trip

    torch.set_num_threads(threads or os.cpu_count() or 1)
    paths = list_images(folder)
    if not paths:
        raise SystemExit(f"--kodak {folder}: no images")
    try:
        images = [_read(path) for path in paths]
    except ValueError as exc:
        raise SystemExit(f"--kodak: {exc}") from None
    round_trip("nic", quality, images[0], None)  # warm-up: weights, tables, oneDNN kernels
    times = [round_trip("nic", quality, pixels, None)[2:] for pixels in images]
    height, width = images[0].shape[:2]
    return (len(images), (width, height), 1e3 * float(np.mean([t[0] for t in times])),
            1e3 * float(np.mean([t[1] for t in times])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", metavar="SIZE", nargs="+",
                        help="image sizes: megapixels (3:2, e.g. 24 → 6000x4000) or WxH (e.g. 20000x20000)")
    parser.add_argument("-q", "--quality", type=int, default=4)
    parser.add_argument("-j", "--threads", type=int, default=None, help="passed to nic as -j")
    parser.add_argument("--tile", type=int, default=None, help="set nic.tiling.DEFAULT_TILE in the nic process")
    parser.add_argument("--mallopt", choices=sorted(MALLOPT), default=None,
                        help="run nic with glibc's mmap off and trim threshold at 1 GiB, for the whole "
                             "process or only around the tiled transforms (see MALLOPT)")
    parser.add_argument("--model", default=None, help="passed to nic encode as --model (a model family)")
    parser.add_argument("--weights", type=Path, default=None, help="passed to nic encode and decode as --weights")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                        help="passed to nic encode and decode as --precision (nic.precision; default auto)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the files in this folder")
    parser.add_argument("--kodak", type=Path, default=None, metavar="DIR",
                        help="also time in-process encode/decode of every image in DIR (ms per image)")
    args = parser.parse_args()

    from PIL import Image

    from nic.container import DEFAULT_MAX_PIXELS

    if not os.path.exists(TIME):
        print(f"({TIME} not found: using getrusage(RUSAGE_CHILDREN))", file=sys.stderr)
    nic = nic_command(args.tile, args.mallopt)
    extra = ["-j", str(args.threads)] if args.threads else []
    extra += ["--precision", args.precision] if args.precision else []
    if args.weights is not None:
        extra += ["--weights", str(args.weights)]
    family = ["--model", args.model] if args.model else []
    folder = Path(tempfile.mkdtemp(prefix="nic-memory-")) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    baseline, baseline_s = run_measured([sys.executable, "-c", "import torch, PIL.Image, nic.api, nic.weights; "
                                         "nic.weights.default_weights()"])
    print(f"baseline (python + torch + nic + weights loaded): {baseline:.0f} MiB, {baseline_s:.1f} s", flush=True)
    rows = [f"| python + torch + nic + weights | | | | {baseline:.0f} MiB | | | |"]
    if args.kodak is not None:
        count, (kw, kh), enc_ms, dec_ms = kodak_speed(args.kodak, args.quality, args.threads)
        mp = kw * kh / 1e6
        print(f"{args.kodak}: {count} images, in-process: encode {enc_ms:.0f} ms, decode {dec_ms:.0f} ms per image",
              flush=True)
        rows.append(f"| {args.kodak.name} ({count} images, in-process, mean) | {kw}x{kh} | {enc_ms:.0f} ms | "
                    f"{mp / enc_ms * 1e3:.2f} | | {dec_ms:.0f} ms | {mp / dec_ms * 1e3:.2f} | |")
    print(f"{'size':>12} {'MP':>6} {'PNG MiB':>8} {'encode MiB':>11} {'enc s':>7} {'decode MiB':>11} "
          f"{'dec s':>7} {'bpp':>6}", flush=True)
    try:
        for size in args.sizes:
            width, height = parse_size(size)
            src, coded, out = folder / f"{width}x{height}.png", folder / f"{width}x{height}.nic", \
                folder / f"{width}x{height}.out.png"
            pixels = synthetic_image(width, height)
            Image.fromarray(pixels).save(src, compress_level=1)
            del pixels
            limit = ["--max-pixels", str(max(DEFAULT_MAX_PIXELS, width * height))]
            enc_rss, enc_s = run_measured([*nic, "encode", str(src), "-q", str(args.quality), "-o", str(coded),
                                           *family, *limit, *extra])
            dec_rss, dec_s = run_measured([*nic, "decode", str(coded), "-o", str(out), *limit, *extra])
            bpp = 8 * coded.stat().st_size / (width * height)
            print(f"{f'{width}x{height}':>12} {width * height / 1e6:6.1f} {src.stat().st_size / 2**20:8.1f} "
                  f"{enc_rss:11.0f} {enc_s:7.1f} {dec_rss:11.0f} {dec_s:7.1f} {bpp:6.3f}", flush=True)
            mp = width * height / 1e6
            rows.append(f"| {mp:.1f} MP, whole process, PNG in and out | {width}x{height} | {enc_s:.1f} s | "
                        f"{mp / enc_s:.2f} | {enc_rss:.0f} MiB | {dec_s:.1f} s | {mp / dec_s:.2f} | {dec_rss:.0f} MiB |")
            if args.keep is None:
                for path in (src, coded, out):
                    path.unlink(missing_ok=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    threads = args.threads or os.cpu_count()
    print(f"\nquality {args.quality}, {threads} threads\n")
    print("| image | size | encode | MP/s | encode peak RSS | decode | MP/s | decode peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
