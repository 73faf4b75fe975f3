#!/usr/bin/env python
"""Long fuzz runs of the .nic decoder, beyond the CI-sized run of tests/test_fuzz.py.

    python tools/fuzz_decode.py --seconds 600            # rounds of fresh random seeds
    python tools/fuzz_decode.py --seconds 60 --examples 300 --json counts.json

Each round runs the property-based targets of tests/test_fuzz.py (the parser, the
range decoder, and decode_pixels on raw mutants, on raw mutants with recomputed
CRCs, and on header/payload edits) with a new Hypothesis seed, so no two rounds
try the same inputs; CI always replays the derandomized examples. The invariant is
the one of tests/test_fuzz.py. On a violation the falsifying input is printed with
Hypothesis' reproduction line and the exit code is 1. The outcome counts (how many
inputs ended how) are printed at the end, and written as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="time budget (a round is not cut short)")
    parser.add_argument("--examples", type=int, default=300,
                        help="examples per target per round (the cheap targets run more)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the outcome counts here")
    args = parser.parse_args()

    os.environ["NIC_FUZZ_EXAMPLES"] = str(args.examples)  # read when test_fuzz is imported
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from hypothesis import seed

    import test_fuzz as fuzz

    targets = [fuzz.test_fuzz_container_unpack, fuzz.test_fuzz_range_decoder,
               fuzz.test_fuzz_decode_raw_mutations, fuzz.test_fuzz_decode_raw_mutations_with_valid_crcs,
               fuzz.test_fuzz_decode_header_and_payload_edits]
    torch.set_num_threads(1)
    fuzz.seeds()
    started = time.perf_counter()
    round_seed = args.first_seed
    failed = False
    while time.perf_counter() - started < args.seconds:
        for target in targets:
            try:
                with fuzz.watchdog():
                    seed(round_seed)(target)()
            except Exception:
                traceback.print_exc()
                print(f"\nINVARIANT VIOLATED in {target.__name__}, seed {round_seed}", file=sys.stderr)
                failed = True
                break
        if failed:
            break
        elapsed = time.perf_counter() - started
        total = sum(fuzz.OUTCOMES.values())
        print(f"round {round_seed}: {total} inputs in {elapsed:.0f} s", file=sys.stderr, flush=True)
        round_seed += 1

    elapsed = time.perf_counter() - started
    counts = dict(sorted(fuzz.OUTCOMES.items()))
    summary = {"seconds": round(elapsed, 1), "complete_rounds": round_seed - args.first_seed,
               "seeds": [args.first_seed, round_seed if failed else round_seed - 1],
               "inputs": sum(counts.values()), "violations": int(failed), "outcomes": counts}
    for name, count in counts.items():
        print(f"{count:>9}  {name}")
    print(f"{summary['inputs']:>9}  inputs in {elapsed:.0f} s, {'1 violation' if failed else 'no violation'}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
