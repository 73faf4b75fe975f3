"""Training throughput (pixels/second) of the nic model under each numeric setup.

    python tools/train_speed.py [--batch 8] [--patch 128] [--steps 6] [--threads 2] [--compile]

Times full training steps (forward, R + λD loss, backward, Adam) of the default
model (N=128, M=192) on random crops-sized tensors, for fp32 NCHW, channels_last,
bf16 autocast and both (and, with --compile, channels_last with the numerics
`nic train` picks on this CPU under torch.compile: the first steps compile, which takes
minutes), and prints a table. The first line names the CPU's vector extensions: bf16 is
fast only with bf16 instructions (AVX-512 BF16 or AMX; nic.train.bf16_is_fast). Run it on an otherwise idle machine:
another process on the same cores slows torch's thread pool far more than its share.
"""

from __future__ import annotations

import argparse
import time

import torch

from nic.factorized import Codec, rate_distortion_loss
from nic.train import bf16_is_fast


def measure(channels_last: bool, bf16: bool, batch: int, patch: int, steps: int, compiled: bool = False) -> float:
    torch.manual_seed(0)
    model = Codec()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    network = torch.compile(model) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(batch, 3, patch, patch)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    qualities = torch.arange(batch) % 8 + 1
    lambdas = torch.tensor(model.config.lambdas)[qualities - 1]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x_tilde, bits = network(x, qualities)
        loss = rate_distortion_loss(x, x_tilde, bits, lambdas)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    warm = times[3:] if compiled else times[1:]  # compiling (and recompiling once) is not throughput
    best = sorted(warm)[len(warm) // 2]  # median of the warm steps
    return batch * patch * patch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true",
                        help="add a row: channels_last with nic train's numerics for this CPU, compiled")
    parser.add_argument("--only-compile", action="store_true", help="only that row and its uncompiled twin")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = bf16_is_fast("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.patch}², "
          f"CPU {torch.backends.cpu.get_cpu_capability()}, bf16 instructions: {'yes' if bf16 else 'no'}")
    print(f"{'setup':<32}{'kpx/s':>8}{'speed-up':>10}")
    base = None
    setups = [("fp32 NCHW", False, False, False), ("fp32 channels_last", True, False, False),
              ("bf16 autocast NCHW", False, True, False), ("bf16 autocast channels_last", True, True, False)]
    if args.only_compile:
        setups = [setups[3 if bf16 else 1]]
    if args.compile or args.only_compile:
        setups.append((f"{'bf16' if bf16 else 'fp32'} channels_last, compiled", True, bf16, True))
    for name, cl, bf16, compiled in setups:
        rate = measure(cl, bf16, args.batch, args.patch, max(args.steps, 8) if compiled else args.steps, compiled)
        base = base or rate
        print(f"{name:<32}{rate / 1e3:>8.0f}{rate / base:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
