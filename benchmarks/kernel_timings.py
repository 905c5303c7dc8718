"""The merge kernels (surgery/compute/_combine.c) timed in-process on one block: the weighted sum, the
trimmed merge and the L1 norms, with no trim, with DARE's seeded mask and with della's ranked one (rows of
2048), on 4M bf16 entries of a base and two models; best of --runs, in ms. The kernels' version (plain,
AVX2, AVX-512: SURGERY_KERNEL_ISA asks for a narrower one) is printed.

    python benchmarks/kernel_timings.py [--at OTHER-CHECKOUT] [--runs 7]

`--at` times another checkout's built kernel (a `git worktree` with `python setup.py build_ext --inplace`)
instead of the installed one, for a before/after pair.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

ENTRIES = 1 << 22


def best_of(runs: int, call: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--at", help="another checkout whose built kernel to time")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if args.at:
        sys.path.insert(0, args.at)
    from surgery.compute import _combine as kernel

    rng = np.random.default_rng(0)
    inputs = tuple(memoryview((rng.standard_normal(ENTRIES, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16))
                   for _ in range(3))
    out = memoryview(bytearray(2 * ENTRIES))
    version = kernel.isa() if hasattr(kernel, "isa") else "avx2 or plain"
    print(f"{kernel.__file__} ({version}): 4M bf16 entries, base + 2 models, best of {args.runs}, ms\n")
    print("| kernel | ms |\n|---|---|")
    print(f"| combine (task arithmetic) | "
          f"{best_of(args.runs, lambda: kernel.combine(out, 'BF16', inputs, 'BF16', (0.5, 0.5), True, True, False, 0.0, 1.0)):.2f} |")
    for name, kind in (("no trim", 0), ("DARE's mask", 4), ("della's ranks", 5)):
        trim = (kind, 0.0, 0, 0.0, 0, 12345, 1 << 23, 2048 if kind == 5 else 1, 0.2, 0.4)
        print(f"| l1_norms, {name} | {best_of(args.runs, lambda: kernel.l1_norms(inputs, 'BF16', (trim, trim), 0)):.2f} |")
        merged = best_of(args.runs, lambda: kernel.ties(out, "BF16", inputs, "BF16", (trim, trim), (0.5, 0.5),
                                                        (1.0, 1.0), True, False, 1.0, 1.0, 0))
        print(f"| ties (sign election), {name} | {merged:.2f} |")
    if hasattr(kernel, "isa"):  # della's masks kept as bits by its L1 pass, read by the merge (since 2026-12-06)
        packed = bytearray(2 * ENTRIES // 8)
        kernel.l1_norms(inputs, "BF16", (trim, trim), 0, packed)
        merged = best_of(args.runs, lambda: kernel.ties(out, "BF16", inputs, "BF16", (trim, trim), (0.5, 0.5),
                                                        (1.0, 1.0), True, False, 1.0, 1.0, 0, packed))
        print(f"| ties (sign election), della's masks kept by the L1 pass | {merged:.2f} |")


if __name__ == "__main__":
    main()
