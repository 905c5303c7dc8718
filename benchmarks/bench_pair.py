"""Two commands timed as a pair, alternating A B A B..., with the ratio A/B taken pair by pair, so a
comparison holds while the machine's speed drifts (disk flushes, a busy neighbour).

    python benchmarks/bench_pair.py --runs 7 [--cleanup DIR] "COMMAND A" "COMMAND B"

Each command is split as a shell splits words and run without a shell; DIR (an output folder) is
removed before every run; `sync` (untimed) runs before each, as in bench_chain.py. Prints the
median wall seconds and peak RSS of each, and the median (min-max) of the pairs' A/B ratios.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

from bench_chain import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cleanup", type=Path, help="an output folder removed before each run")
    args = parser.parse_args()
    commands = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    for command in commands.values():  # one untimed run each: caches warm, imports compiled
        timed(command, args.cleanup)
    runs: dict[str, list[tuple[float, int]]] = {"A": [], "B": []}
    for _ in range(args.runs):
        for name, command in commands.items():
            runs[name].append(timed(command, args.cleanup))
    for name, results in runs.items():
        wall = statistics.median(t for t, _ in results)
        rss = statistics.median(r for _, r in results) / 2**20
        print(f"{name}: {wall:.3f} s wall, {rss:.0f} MiB peak RSS (median of {args.runs}): {args.a if name == 'A' else args.b}")
    ratios = [a / b for (a, _), (b, _) in zip(runs["A"], runs["B"])]
    print(f"A/B wall, pair by pair: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
