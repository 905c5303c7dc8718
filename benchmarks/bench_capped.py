"""A model larger than the memory it may use, side by side with the same work uncapped: wall time and peak
RSS of `surgery eval` and of a `bits` plan (LIM scores, then GPTQ on the two lowest-scored layers) on the
~1.1B random TinyLlama-shaped checkpoint of bench_chain.py, loaded in float32 (4.4 GB), with and without
`--max-memory`.

    python benchmarks/bench_capped.py [--data bench-data] [--runs 3] [--cap 512MiB]

Each fit runs afresh (its own fits cache, removed after each run), page cache warm, runs interleaved,
medians printed. The scores and outputs are the uncapped ones bit for bit (tests/test_offload.py); this
measures what the cap costs in time and saves in memory. Needs `surgery[offload]` (accelerate).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_chain import timed

PLAN = """model: {model}
steps:
  - op: bits
    score: lim
    calibration: {{data: builtin:mixed-dev, samples: 2, seq_len: 128}}
    assign: {{high: 16, low: 4, low_fraction: 0.1}}
    quantizer: {{method: gptq, group_size: 128}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cap", default="512MiB", help="--max-memory of the capped runs")
    args = parser.parse_args()
    data = args.data.resolve()
    model = data / "tinyllama-1.1b-random"
    subprocess.run([sys.executable, "make_checkpoint.py", str(model), "--tokenizer"], cwd=Path(__file__).parent,
                   check=True)  # a child process: the parent holding tensors would inflate the children's RSS
    work = Path(tempfile.mkdtemp(dir=data))
    plan = work / "bits.yaml"
    plan.write_text(PLAN.format(model=model))
    run = work / "run"  # the output and the fits cache of one run, removed before and after it
    surgery = ["env", f"SURGERY_CACHE={run / 'cache'}", sys.executable, "-m", "surgery"]
    jobs = {
        "eval": [*surgery, "eval", str(model), "--no-compare", "--max-tokens", "512", "--window", "256",
                 "--device", "cpu", "--dtype", "float32", "--json"],
        "bits lim + gptq": [*surgery, "apply", str(plan), "--out", str(run / "out"), "--no-fsync", "--device", "cpu"],
    }
    commands = {f"{job}{label}": [*cmd, *extra] for job, cmd in jobs.items()
                for label, extra in (("", []), (f" --max-memory {args.cap}", ["--max-memory", args.cap]))}
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift in the machine's state hits every command alike
        for name, cmd in commands.items():
            results[name].append(timed(cmd, run))
    print(f"{model.name} (bf16 on disk, {sum(p.stat().st_size for p in model.glob('*.safetensors')) / 1e9:.2f} GB; "
          f"float32 in memory), --device cpu, {args.runs} runs each, median\n")
    print("| command | wall s | peak RSS MiB |")
    print("|---|---|---|")
    medians = {name: (statistics.median(t for t, _ in runs), statistics.median(r for _, r in runs) / 2**20)
               for name, runs in results.items()}
    for name, (wall, rss) in medians.items():
        print(f"| {name} | {wall:.2f} | {rss:.0f} |")
    for job in jobs:
        (free_wall, free_rss), (capped_wall, capped_rss) = medians[job], medians[f"{job} --max-memory {args.cap}"]
        print(f"\n{job}: capped / uncapped wall {capped_wall / free_wall:.2f}, peak RSS {capped_rss / free_rss:.2f}",
              end="")
    print()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
