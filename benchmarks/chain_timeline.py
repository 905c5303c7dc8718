"""Where a `chain` edit's time goes, phase by phase, in one process: imports, the plan's resolve with its
structure check (not remembered, then remembered), and the write with BLAKE3, sha256 or no shard digest.

    python benchmarks/chain_timeline.py [--data bench-data] [--runs 3]

Uses the 1.1B checkpoint of bench_chain.py (generated once) and its drop of layers 8-11, written without
fsync; each write starts after `sync`. Prints seconds per phase (median of --runs) beside `cp -r`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = args.data.resolve() / "tinyllama-1.1b-random"
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_checkpoint.py")), str(model)], check=True,
                   stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(dir=args.data.resolve()))
    plan = work / "drop.yaml"
    plan.write_text(f"model: {model}\noutput: {work / 'out'}\nsteps:\n  - op: chain\n    layers: [0-7, 12-21]\n")
    os.environ["SURGERY_CACHE"] = str(work / "cache")

    started = time.perf_counter()
    import surgery.output.partial as partial
    from surgery.output.execute import execute
    from surgery.plan.resolve import resolve
    phases: dict[str, list[float]] = {"import surgery's apply path": [time.perf_counter() - started]}

    def timed(name: str, run) -> object:  # noqa: ANN001
        start = time.perf_counter()
        value = run()
        phases.setdefault(name, []).append(time.perf_counter() - start)
        return value

    recipe = timed("resolve, structure check not remembered (imports transformers)",
                   lambda: resolve(str(plan), None, "auto", None))
    for _ in range(args.runs):
        timed("resolve, structure check remembered", lambda: resolve(str(plan), None, "auto", None, replacing=True))

    class NoDigest:
        def update(self, data: object) -> None:
            pass

        def hexdigest(self) -> str:
            return "0" * 64

    def write(name: str, copy: list[str] | None = None) -> None:
        shutil.rmtree(work / "out", ignore_errors=True)
        os.sync()
        if copy:
            timed(name, lambda: subprocess.run(copy, check=True))
        else:
            timed(name, lambda: execute(recipe, force=True, fsync=False))
        shutil.rmtree(work / "out", ignore_errors=True)

    digest = partial.shard_hash
    for _ in range(args.runs):
        write("write the 1.85 GB output, BLAKE3 digest beside it")
        partial.shard_hash = hashlib.sha256
        write("write the output, sha256 digest beside it (before issue 26)")
        partial.shard_hash = NoDigest
        write("write the output, no digest")
        partial.shard_hash = digest
        write("cp -r of the 2.20 GB source (the floor)", ["cp", "-r", str(model), str(work / "out")])
    print(f"surgery chain drop 8-11 of {model.name}, --no-fsync, median of {args.runs} (imports and the first "
          "resolve: once)\n")
    print("| phase | seconds |")
    print("|---|---|")
    for name, seconds in phases.items():
        print(f"| {name} | {statistics.median(seconds):.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
