#!/usr/bin/env python
"""Speed of nic's transforms against their FLOP floor (docs/speed.md).

    python tools/bench_speed.py flops                      # FLOPs of g_a and g_s for 768x512
    python tools/bench_speed.py conv -j 2                  # this CPU's 5x5 conv throughput
    python tools/bench_speed.py codec -j 2 IMAGES...       # encode/decode ms per image, in-process
    python tools/bench_speed.py tiles -j 1 2048x1536 --tiles 256 448 768   # tile size sweep
    python tools/bench_speed.py tiling --tile 128 IMAGES...  # tiled against whole-image results
    python tools/bench_speed.py engines -j 2 IMAGES...     # numpy engine against torch: time, latents, PSNR
    python tools/bench_speed.py cli -j 2 IMAGES...         # wall clock of fresh `nic encode` / `nic decode`
                                                           # (--model hyperprior --weights W: that family)
    python tools/bench_speed.py png -j 2 IMAGES...         # writing the decoded PNG: zlib against zlib-ng

IMAGES are files (e.g. ../shared/data/kodak/kodim*.png) or WxH for a generated image.
fp32 against bf16 (``--precision``) has its own tool: tools/precision_table.py.
The model is loaded once; the first run of each shape is a warm-up and not counted.
Measurement only: nothing here is imported by nic.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

# As nic's CLI sets them: nic.engine runs its own threads, and torch's OpenMP threads
# must not spin-wait between regions (they would take the CPU from nic.engine's threads
# when the two engines are timed in turn).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def load_pixels(spec: str) -> tuple[str, np.ndarray]:
    if "x" in spec and not Path(spec).exists():
        w, h = (int(v) for v in spec.lower().split("x"))
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from measure_memory import synthetic_image

        return spec, synthetic_image(w, h)
    from nic.images import read_image

    return Path(spec).name, read_image(Path(spec).read_bytes())


# ---- FLOPs ------------------------------------------------------------------------------

def count_macs(model, height: int, width: int) -> dict[str, list[tuple[str, int]]]:
    """Multiply-adds of every convolution (GDN's 1x1 included) for one image, by a
    forward pass with hooks. A transposed conv costs in_pixels·C_in·C_out·k²."""
    rows: dict[str, list[tuple[str, int]]] = {"g_a": [], "g_s": []}
    current = []
    hooks = []

    def conv_hook(name):
        def hook(module, inputs, output):
            x = inputs[0]
            k = module.kernel_size[0] * module.kernel_size[1]
            if isinstance(module, nn.ConvTranspose2d):
                macs = x.shape[2] * x.shape[3] * module.in_channels * module.out_channels * k
            else:
                macs = output.shape[2] * output.shape[3] * module.in_channels * module.out_channels * k
            current.append((f"{name} {tuple(x.shape[1:])}→{tuple(output.shape[1:])}", macs))
        return hook

    def gdn_hook(name):
        def hook(module, inputs, output):
            x = inputs[0]
            current.append((f"{name} 1x1 {x.shape[1]}x{x.shape[1]} at {x.shape[2]}x{x.shape[3]}",
                            x.shape[1] ** 2 * x.shape[2] * x.shape[3]))
        return hook

    for part in ("g_a", "g_s"):
        for name, module in getattr(model, part).named_children():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                hooks.append(module.register_forward_hook(conv_hook(f"{part}.{name}")))
            else:
                hooks.append(module.register_forward_hook(gdn_hook(f"{part}.{name}")))
    with torch.inference_mode():
        y = model.g_a(torch.zeros(1, 3, height, width))
        rows["g_a"], current[:] = list(current), []
        model.g_s(y)
        rows["g_s"] = list(current)
    for hook in hooks:
        hook.remove()
    return rows


def cmd_flops(args) -> None:
    from nic.weights import default_weights

    model = default_weights()[0]
    for part, rows in count_macs(model, args.height, args.width).items():
        print(f"{part} for {args.width}x{args.height}:")
        for name, macs in rows:
            print(f"  {name:<52} {macs / 1e6:10.1f} M MAC")
        total = sum(m for _, m in rows)
        print(f"  {'total':<52} {total / 1e6:10.1f} M MAC = {2 * total / 1e9:.2f} GFLOP "
              f"({total / (args.width * args.height):.0f} MAC/pixel)")


# ---- raw conv throughput ---------------------------------------------------------------

def cmd_conv(args) -> None:
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 128, 384, 256)  # g_a's second layer for a 768x512 image
    cases = [("conv 5x5/2 128→128 from 384x256", nn.Conv2d(128, 128, 5, 2, 2)),
             ("deconv 5x5/2 128→128 to 384x256", nn.ConvTranspose2d(128, 128, 5, 2, 2, output_padding=1))]
    for name, layer in cases:
        layer = layer.eval()
        inp = x if isinstance(layer, nn.Conv2d) else x[:, :, ::2, ::2].contiguous()
        macs = 192 * 128 * 128 * 128 * 25
        for fmt in ("contiguous", "channels_last"):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            i = inp.contiguous(memory_format=mf)
            l = layer.to(memory_format=mf)
            with torch.inference_mode():
                l(i)
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    l(i)
                    times.append(time.perf_counter() - t0)
            best, med = min(times), statistics.median(times)
            print(f"{name:<36} {fmt:<14} {args.threads} thr: best {best * 1e3:7.1f} ms "
                  f"= {2 * macs / best / 1e9:6.1f} GFLOP/s (median {2 * macs / med / 1e9:6.1f})")


# ---- the codec in-process -------------------------------------------------------------

def cmd_codec(args) -> None:
    from nic import api, factorized, factorized_torch, tiling
    from nic.weights import default_weights

    set_threads(args.threads)
    model = default_weights()[0]
    if args.tile:
        tiling.DEFAULT_TILE = args.tile
    if args.contiguous:
        factorized_torch.MEMORY_FORMAT = torch.contiguous_format
    print(f"threads {args.threads}, tile {tiling.DEFAULT_TILE}, {factorized_torch.MEMORY_FORMAT}, quality {args.quality}")
    totals = {"enc": [], "dec": [], "g_a": [], "g_s": [], "mp": []}
    for spec in args.images:
        name, pixels = load_pixels(spec)
        h, w = pixels.shape[:2]
        api.encode_pixels(pixels, args.quality)  # warm-up (weights, tables, oneDNN primitives)
        enc, dec, ga, gs = [], [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            data = api.encode_pixels(pixels, args.quality)
            t1 = time.perf_counter()
            decoded = api.decode_pixels(data)
            t2 = time.perf_counter()
            latents = factorized.quantize_latents(model, pixels, args.quality)
            t3 = time.perf_counter()
            factorized.reconstruct(model, latents, args.quality, h, w, pixels.shape[2] == 1)
            t4 = time.perf_counter()
            enc.append(t1 - t0), dec.append(t2 - t1), ga.append(t3 - t2), gs.append(t4 - t3)
        mse = np.mean((decoded.pixels.astype(np.float64) - pixels) ** 2)
        print(f"{name:<14} {w}x{h}  encode {min(enc) * 1e3:7.0f} ms (g_a {min(ga) * 1e3:6.0f})  "
              f"decode {min(dec) * 1e3:7.0f} ms (g_s {min(gs) * 1e3:6.0f})  "
              f"{8 * len(data) / (w * h):.3f} bpp  {10 * np.log10(255**2 / mse):.2f} dB", flush=True)
        for key, values in (("enc", enc), ("dec", dec), ("g_a", ga), ("g_s", gs)):
            totals[key].append(min(values))
        totals["mp"].append(w * h / 1e6)
    if len(args.images) > 1:
        mp = sum(totals["mp"])
        print(f"mean over {len(args.images)}: encode {statistics.mean(totals['enc']) * 1e3:.0f} ms, "
              f"decode {statistics.mean(totals['dec']) * 1e3:.0f} ms, g_a {statistics.mean(totals['g_a']) * 1e3:.0f} ms, "
              f"g_s {statistics.mean(totals['g_s']) * 1e3:.0f} ms; encode {mp / sum(totals['enc']):.2f} MP/s, "
              f"decode {mp / sum(totals['dec']):.2f} MP/s")


def set_threads(threads: int) -> None:
    """Threads for torch and for the numpy engine, as ``nic -j`` sets them (BLAS itself is
    single-threaded, as in nic's CLI: see the top of this file)."""
    from nic import engine

    torch.set_num_threads(threads)
    engine.set_threads(threads)


def cmd_engines(args) -> None:
    """The numpy engine (nic.factorized.Model, what nic codes with) against the torch
    network of the same weights, interleaved per image: g_a and g_s times, how many
    integers g_a picks differently, and the PSNR of each engine's decoding."""
    from nic import tiling
    from nic.weights import default_weights

    set_threads(args.threads)
    engines = {"numpy": default_weights(family="factorized", coding=True)[0],
               "torch": default_weights(family="factorized")[0]}
    print(f"{args.threads} threads, quality {args.quality}, best of {args.repeat}")
    print(f"{'image':<14} {'size':>9} {'g_a numpy':>9} {'g_a torch':>9} {'ratio':>5} {'g_s numpy':>9} "
          f"{'g_s torch':>9} {'ratio':>5} {'latents differ':>14} {'dB numpy':>9} {'dB torch':>9}")
    totals = {key: 0.0 for key in ("an", "at", "sn", "st")}
    differ = count = 0
    for spec in args.images:
        name, pixels = load_pixels(spec)
        h, w = pixels.shape[:2]
        times: dict[str, list[float]] = {key: [] for key in totals}
        reference = None  # the numpy engine's integers (it runs first): torch decodes the same ones
        for _ in range(args.repeat + 1):  # the first round warms up
            for engine, model in engines.items():
                t0 = time.perf_counter()
                latents = tiling.quantize_tiled(model, pixels, args.quality)
                t1 = time.perf_counter()
                out = tiling.reconstruct_tiled(model, reference if engine == "torch" else latents,
                                               args.quality, h, w, pixels.shape[2] == 1)
                t2 = time.perf_counter()
                if engine == "numpy":
                    reference, decoded_numpy = latents, out
                else:
                    changed, decoded_torch = int(np.count_nonzero(latents != reference)), out
                times["a" + engine[0]].append(t1 - t0)
                times["s" + engine[0]].append(t2 - t1)
        best = {key: min(values[1:]) for key, values in times.items()}
        for key in totals:
            totals[key] += best[key]
        differ, count = differ + changed, count + reference.size

        def db(out):
            return 10 * np.log10(255**2 / np.mean((out.astype(np.float64) - pixels) ** 2))

        print(f"{name:<14} {w}x{h:<4} {best['an'] * 1e3:7.0f}ms {best['at'] * 1e3:7.0f}ms {best['an'] / best['at']:5.2f} "
              f"{best['sn'] * 1e3:7.0f}ms {best['st'] * 1e3:7.0f}ms {best['sn'] / best['st']:5.2f} "
              f"{changed:>14} {db(decoded_numpy):9.4f} {db(decoded_torch):9.4f}", flush=True)
    print(f"all {len(args.images)}: g_a {totals['an'] / totals['at']:.2f}x and g_s {totals['sn'] / totals['st']:.2f}x "
          f"torch's time; {differ} of {count} latents differ")


def cmd_cli(args) -> None:
    """Wall clock of fresh `nic encode` and `nic decode` processes (start-up included),
    best of --repeat, and whether each imported torch."""
    import os
    import subprocess
    import tempfile

    from PIL import Image

    probe = ("import sys, runpy; sys.argv = ['nic', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('nic', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('TORCH' if sys.modules.get('torch') is not None else 'NOTORCH', file=sys.stderr)\n")
    with tempfile.TemporaryDirectory() as folder:
        print(f"{args.threads or 'all'} threads, quality {args.quality}, best of {args.repeat}, fresh process each")
        for spec in args.images:
            name, pixels = load_pixels(spec)
            source = os.path.join(folder, "in.png")
            Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(source)
            row = []
            weights = ["--weights", args.weights] if args.weights else []
            family = ["--model", args.model] if args.model else []
            for command in (["encode", source, "-q", str(args.quality), "-o", os.path.join(folder, "a.nic"),
                             *family, *weights],
                            ["decode", os.path.join(folder, "a.nic"), "-o", os.path.join(folder, "out.png"), *weights]):
                best, torch_used = float("inf"), None
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    threads = ["-j", str(args.threads)] if args.threads else []
                    proc = subprocess.run([sys.executable, "-c", probe, *command, *threads],
                                          capture_output=True, check=True)
                    best = min(best, time.perf_counter() - t0)
                    torch_used = proc.stderr.decode().strip().splitlines()[-1]
                row.append(f"{command[0]} {best * 1e3:6.0f} ms ({'torch' if torch_used == 'TORCH' else 'no torch'})")
            print(f"{name:<14} {pixels.shape[1]}x{pixels.shape[0]:<5} " + "   ".join(row), flush=True)


def cmd_tiles(args) -> None:
    """g_a and g_s per tile size: wall and CPU seconds (process CPU time is the fairer
    number while other processes load the machine) and minor page faults (fresh
    memory the allocator had to get from the kernel)."""
    from nic import tiling
    from nic.weights import default_weights

    torch.set_num_threads(args.threads)
    model = default_weights()[0]
    name, pixels = load_pixels(args.image)
    h, w = pixels.shape[:2]
    reference = None

    def measured(f):
        r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        out = f()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return out, (time.perf_counter() - w0, time.process_time() - c0, r1.ru_minflt - r0.ru_minflt)

    results: dict[int, list] = {}
    for _ in range(args.repeat):
        for tile in args.tiles:  # interleaved, so a burst of load hits every size alike
            latents, enc = measured(lambda: tiling.quantize_tiled(model, pixels, args.quality, tile))
            _, dec = measured(lambda: tiling.reconstruct_tiled(model, latents, args.quality, h, w, False, tile))
            if reference is None:
                reference = latents
            changed = int(np.count_nonzero(latents != reference))
            results.setdefault(tile, []).append((*enc, *dec, changed))
    print(f"{name} {w}x{h}, {args.threads} threads; best of {args.repeat}")
    print(f"{'tile':>5} {'tiles':>5} {'enc wall':>9} {'enc cpu':>8} {'enc faults':>10} "
          f"{'dec wall':>9} {'dec cpu':>8} {'dec faults':>10} {'changed':>7}")
    for tile, rows in results.items():
        a = np.array(rows)
        n = len(tiling.tiles(-(-h // 16), -(-w // 16), tile))
        print(f"{tile:>5} {n:>5} {a[:, 0].min():9.2f} {a[:, 1].min():8.2f} {a[:, 2].min():10.0f} "
              f"{a[:, 3].min():9.2f} {a[:, 4].min():8.2f} {a[:, 5].min():10.0f} {int(a[:, 6].max()):>7}")


def cmd_tiling(args) -> None:
    """Tiled against whole-image inference, per image and quality: latents that differ,
    and the PSNR of tiled encode + tiled decode against whole encode + whole decode."""
    from nic import tiling
    from nic.bench import psnr
    from nic.weights import default_weights

    torch.set_num_threads(args.threads)
    model = default_weights()[0]
    changed = latents_total = 0
    gaps = []
    for spec in args.images:
        name, pixels = load_pixels(spec)
        h, w = pixels.shape[:2]
        whole = -(-max(h, w) // 16) * 16  # one tile: whole-image inference
        gray = pixels.shape[2] == 1
        for quality in args.qualities:
            lat_tiled = tiling.quantize_tiled(model, pixels, quality, args.tile)
            lat_whole = tiling.quantize_tiled(model, pixels, quality, whole)
            out_tiled = tiling.reconstruct_tiled(model, lat_tiled, quality, h, w, gray, args.tile)
            out_whole = tiling.reconstruct_tiled(model, lat_whole, quality, h, w, gray, whole)
            diff = int(np.count_nonzero(lat_tiled != lat_whole))
            gap = psnr(pixels, out_tiled) - psnr(pixels, out_whole)
            changed, latents_total = changed + diff, latents_total + lat_whole.size
            gaps.append(gap)
            print(f"{name} q{quality}: {diff} of {lat_whole.size} latents differ, PSNR tiled − whole "
                  f"{gap:+.4f} dB, max pixel difference "
                  f"{int(np.abs(out_tiled.astype(int) - out_whole).max())}", flush=True)
    print(f"tile {args.tile}: {changed} of {latents_total} latents differ; PSNR tiled − whole: "
          f"largest |gap| {max(abs(g) for g in gaps):.4f} dB, mean {float(np.mean(gaps)):+.5f} dB")


def cmd_png(args) -> None:
    """Writing each image's decoded pixels (the default at -q) as PNG, with each deflater
    nic.streaming can use: in-process wall clock (best of --repeat) and file size."""
    import io
    import zlib

    import nic
    from nic import engine, streaming

    deflaters = {"zlib": zlib}
    try:
        from zlib_ng import zlib_ng
        deflaters["zlib-ng"] = zlib_ng
    except ImportError:
        print("zlib-ng is not installed: zlib only")
    engine.set_threads(args.threads)
    print(f"{args.threads} threads, q{args.quality}, best of {args.repeat}")
    print(f"{'image':<28}" + "".join(f"{name + ' ms':>12}{name + ' bytes':>14}" for name in deflaters))
    totals = {name: [0.0, 0] for name in deflaters}
    for spec in args.images:
        name, pixels = load_pixels(spec)
        decoded = np.asarray(nic.decode(nic.encode(pixels, quality=args.quality)))
        decoded = decoded.reshape(decoded.shape[0], decoded.shape[1], -1)
        row = f"{name[:27]:<28}"
        for label, module in deflaters.items():
            streaming._deflater = lambda module=module: module
            best, size = float("inf"), 0
            for _ in range(args.repeat):
                buffer = io.BytesIO()
                start = time.perf_counter()
                writer = streaming.row_writer("PNG", buffer, decoded.shape[1], decoded.shape[0], decoded.shape[2])
                writer.write(decoded)
                writer.close()
                best, size = min(best, time.perf_counter() - start), len(buffer.getvalue())
            totals[label][0] += best
            totals[label][1] += size
            row += f"{best * 1e3:12.1f}{size:14,d}"
        print(row, flush=True)
    print(f"{'total':<28}" + "".join(f"{t * 1e3:12.1f}{n:14,d}" for t, n in totals.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("flops")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=512)
    p.set_defaults(run=cmd_flops)
    p = sub.add_parser("conv")
    p.add_argument("-j", "--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeat", type=int, default=5)
    p.set_defaults(run=cmd_conv)
    p = sub.add_parser("codec")
    p.add_argument("images", nargs="+")
    p.add_argument("-j", "--threads", type=int, default=torch.get_num_threads())
    p.add_argument("-q", "--quality", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--tile", type=int, default=None, help="override nic.tiling.DEFAULT_TILE")
    p.add_argument("--contiguous", action="store_true", help="NCHW tiles instead of channels_last")
    p.set_defaults(run=cmd_codec)
    p = sub.add_parser("tiles")
    p.add_argument("image")
    p.add_argument("--tiles", type=int, nargs="+", default=[256, 384, 448, 512, 768, 1024])
    p.add_argument("-j", "--threads", type=int, default=torch.get_num_threads())
    p.add_argument("-q", "--quality", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.set_defaults(run=cmd_tiles)
    p = sub.add_parser("tiling")
    p.add_argument("images", nargs="+")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("-j", "--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--qualities", type=int, nargs="+", default=[1, 8])
    p.set_defaults(run=cmd_tiling)
    p = sub.add_parser("engines")
    p.add_argument("images", nargs="+")
    p.add_argument("-j", "--threads", type=int, default=torch.get_num_threads())
    p.add_argument("-q", "--quality", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.set_defaults(run=cmd_engines)
    p = sub.add_parser("cli")
    p.add_argument("images", nargs="+")
    p.add_argument("-j", "--threads", type=int, default=None, help="nic's -j [default: not given]")
    p.add_argument("-q", "--quality", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default=None, help="nic encode's --model (a model family)")
    p.add_argument("--weights", default=None, help="nic's --weights")
    p.set_defaults(run=cmd_cli)
    p = sub.add_parser("png")
    p.add_argument("images", nargs="+")
    p.add_argument("-j", "--threads", type=int, default=2)
    p.add_argument("-q", "--quality", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(run=cmd_png)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
