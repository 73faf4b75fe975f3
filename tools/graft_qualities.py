"""Graft models trained for one quality each into a shared model's weights file.

    python tools/graft_qualities.py weights/default.npz -q 1=runs/spec/q1.npz \
        -q 2=runs/spec/q2.npz -o runs/spec/grafted.npz [--half]

Each ``Q=FILE`` is a whole model (same M and number of qualities as BASE; its N, or
the width of its own pair for Q, comes along) trained
for quality Q alone (Q's λ is taken from FILE), e.g. ``nic train --init BASE --quality Q`` run on another machine, or
in parallel with the others. The result keeps BASE for every other quality and gives
Q its own g_a/g_s from FILE, with FILE's gain, inverse gain and density for Q (see
``nic.factorized.specialize``); it is what ``nic train --specialize`` would have produced
from the same runs. Prints the new weights hash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nic.factorized import specialize, to_arrays
from nic.weights import default_weights, save_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="weights holding the shared pair")
    parser.add_argument("-q", "--quality", action="append", required=True, metavar="Q=FILE",
                        help="quality Q takes its transforms from weights FILE (repeatable)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--half", action="store_true", help="store conv kernels as fp16")
    args = parser.parse_args(argv)
    sources = {}
    for item in args.quality:
        quality, _, path = item.partition("=")
        if not quality.isdigit() or not path:
            parser.error(f"-q {item}: expected Q=FILE")
        sources[int(quality)] = path
    try:  # WeightsError (unreadable or invalid files) is a ValueError too
        donors = {quality: default_weights(path, "factorized")[0] for quality, path in sources.items()}
        model = specialize(default_weights(args.base, "factorized")[0], [], donors)
    except ValueError as exc:
        print(f"graft_qualities: {exc}", file=sys.stderr)
        return 1
    digest = save_weights(to_arrays(model, half=args.half), args.output)
    print(f"{args.output}: weights {digest.hex()}, specialized qualities {list(model.config.specialized)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
