"""Where one `surgery diff --json A B` spends its time, beside the floor for its measuring.

    python benchmarks/diff_timeline.py [--data bench-data] [--runs 3]

Each run is a fresh interpreter that marks, in seconds from its process start: the CLI imported,
the diff's modules imported, the layer pairing begun and ended, and the command done. The floor
is a bare loop of the C kernel over the same shards' mapped 8 MiB parts, one thread per core
(up to 8), nothing else: what measuring costs on this machine when the diff adds nothing. Run
bench_diff.py first (it generates A and B, the fine-tune). Linux only: the start is read
from /proc.
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from surgery.comparison.workers import available_cores

PART_BYTES = 8 << 20

RUN = """
import json, os, sys, time
with open("/proc/self/stat") as f:
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
with open("/proc/uptime") as f:
    started = time.time() - float(f.read().split()[0]) + ticks / os.sysconf("SC_CLK_TCK")
marks = []
mark = lambda what: marks.append((what, time.time() - started))
mark("interpreter started")
import surgery.cli as cli
mark("CLI imported")
import surgery.comparison.report as report
mark("diff modules imported")
pair = report._pair
def timed_pair(*args, **kwargs):
    mark("opened both, pairing layers")
    pairs = pair(*args, **kwargs)
    mark("layers paired")
    return pairs
report._pair = timed_pair
sys.argv = ["surgery", "diff", "--json", *sys.argv[1:]]
try:
    cli.main()
except SystemExit:
    pass
mark("measured and printed")
print(json.dumps(marks), file=sys.stderr)
"""


def timeline(a: Path, b: Path) -> list[tuple[str, float]]:
    proc = subprocess.run([sys.executable, "-c", RUN, str(a), str(b)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=True)
    return [(what, at) for what, at in json.loads(proc.stderr.strip().splitlines()[-1])]


def kernel_floor(a: Path, b: Path) -> float:
    """Seconds for the kernel alone over every whole 8 MiB part the two checkpoints' shards share."""
    from surgery.comparison._measure import measure

    jobs = []
    for shard_a, shard_b in zip(sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))):
        size = min(shard_a.stat().st_size, shard_b.stat().st_size) // PART_BYTES * PART_BYTES
        jobs += [(shard_a, shard_b, offset) for offset in range(0, size, PART_BYTES)]

    def part(job: tuple[Path, Path, int]) -> None:
        with open(job[0], "rb") as fa, open(job[1], "rb") as fb, \
                mmap.mmap(fa.fileno(), PART_BYTES, prot=mmap.PROT_READ, offset=job[2]) as ma, \
                mmap.mmap(fb.fileno(), PART_BYTES, prot=mmap.PROT_READ, offset=job[2]) as mb:
            measure(ma, "BF16", mb, "BF16", 0.0, 0.0)

    start = time.perf_counter()
    with ThreadPoolExecutor(min(available_cores(), 8)) as pool:
        list(pool.map(part, jobs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    a, b = (args.data / f"tinyllama-1.1b-random{suffix}" for suffix in ("", "-ft"))
    if not (b / "config.json").exists():
        raise SystemExit(f"{b} is missing: run benchmarks/bench_diff.py first")
    timeline(a, b)  # warm the page cache
    for run in range(args.runs):
        marks = timeline(a, b)
        steps = [f"{what} {at:.2f}" for what, at in marks]
        print(f"run {run + 1}: " + ", ".join(steps))
        print(f"  kernel alone over the same parts, {min(available_cores(), 8)} threads: {kernel_floor(a, b):.2f} s")


if __name__ == "__main__":
    main()
