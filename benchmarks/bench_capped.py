"""A model larger than the memory it may use, side by side with the same work uncapped: wall time and peak
memory of `surgery eval`, of a `bits` plan (LIM scores, the lowest-scored layer rounded by RTN, or with
`--gptq` also calibrated by GPTQ: minutes on a CPU) and with `--atlas` of aTLAS learning its per-layer
coefficients for one noisy variant (2 steps of 64 tokens: uncapped it holds the base and the task vector
in float32, 8.8 GB, plus the merged weights and their gradients) on the
~1.1B random TinyLlama-shaped checkpoint of bench_chain.py, loaded in float32 (4.4 GB), with and without
`--max-memory`.

    python benchmarks/bench_capped.py [--data bench-data] [--runs 3] [--cap 512MiB] [--gptq] [--atlas]

Each fit runs afresh (its own fits cache, removed after each run), page cache warm, runs interleaved,
medians printed. Peak RSS counts the checkpoint's pages the process maps (the page cache's, shared and
reclaimable); the peak of its own memory (RssAnon, read every 20 ms) is what a cap bounds. The scores
and outputs are the uncapped ones bit for bit (tests/test_offload.py); this measures what the cap costs
in time and saves in memory. Needs `surgery[offload]` (accelerate).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PLAN = """model: {model}
steps:
  - op: bits
    score: lim
    calibration: {{data: builtin:mixed-dev, samples: 2, seq_len: 128}}
    assign: {{high: 16, low: 4, low_fraction: 0.05}}
    quantizer: {{method: {method}, group_size: 128}}
"""
ATLAS = """model: {model}
base: {model}
steps:
  - op: atlas
    models: [{variant}]
    granularity: layer
    learn: {{data: builtin:mixed-dev, steps: 2, batch_size: 1, window: 64, max_tokens: 512}}
"""


def measured(cmd: list[str], cleanup: Path) -> tuple[float, int, int]:
    """Wall seconds, peak RSS and peak anonymous RSS (bytes) of one run; `cleanup` removed before and after."""
    shutil.rmtree(cleanup, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()
    threading.Thread(target=_watch_anonymous, args=(proc.pid, peak, done), daemon=True).start()
    stderr = proc.stderr.read() if proc.stderr else b""  # drained as it runs: a full pipe would stall the child
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    done.set()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {stderr.decode()[-2000:]}")
    shutil.rmtree(cleanup, ignore_errors=True)
    return elapsed, usage.ru_maxrss * 1024, peak[0]


def _watch_anonymous(pid: int, peak: list[int], done: threading.Event) -> None:
    while not done.wait(0.02):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cap", default="512MiB", help="--max-memory of the capped runs")
    parser.add_argument("--gptq", action="store_true", help="also the plan with GPTQ (minutes per run on a CPU)")
    parser.add_argument("--atlas", action="store_true", help="also aTLAS learning (needs about 20 GB uncapped)")
    args = parser.parse_args()
    data = args.data.resolve()
    model = data / "tinyllama-1.1b-random"
    variant = data / "tinyllama-1.1b-noisy1"
    subprocess.run([sys.executable, "make_checkpoint.py", str(model), "--tokenizer"], cwd=Path(__file__).parent,
                   check=True)  # a child process: the parent holding tensors would inflate the children's RSS
    if args.atlas:
        subprocess.run([sys.executable, "-c", f"from make_checkpoint import noisy_variant\n"
                        f"from pathlib import Path\nnoisy_variant(Path({str(model)!r}), {str(variant)!r}, 1)"], cwd=Path(__file__).parent, check=True)
    work = Path(tempfile.mkdtemp(dir=data))
    plans = {method: work / f"{method}.yaml" for method in ("rtn", "gptq")}
    for method, plan in plans.items():
        plan.write_text(PLAN.format(model=model, method=method))
    (work / "atlas.yaml").write_text(ATLAS.format(model=model, variant=variant))
    run = work / "run"  # the output and the fits cache of one run, removed before and after it
    surgery = ["env", f"SURGERY_CACHE={run / 'cache'}", sys.executable, "-m", "surgery"]
    jobs = {
        "eval": [*surgery, "eval", str(model), "--no-compare", "--max-tokens", "256", "--window", "128",
                 "--device", "cpu", "--dtype", "float32", "--json"],
        **{f"bits lim + {method}": [*surgery, "apply", str(plans[method]), "--out", str(run / "out"), "--no-fsync",
                                    "--device", "cpu"] for method in ("rtn", "gptq") if method == "rtn" or args.gptq},
        **({"atlas learn (1 task vector)": [*surgery, "apply", str(work / "atlas.yaml"), "--out", str(run / "out"),
                                            "--no-fsync", "--device", "cpu"]} if args.atlas else {}),
    }
    commands = {f"{job}{label}": [*cmd, *extra] for job, cmd in jobs.items()
                for label, extra in (("", []), (f" --max-memory {args.cap}", ["--max-memory", args.cap]))}
    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift in the machine's state hits every command alike
        for name, cmd in commands.items():
            results[name].append(measured(cmd, run))
    print(f"{model.name} (bf16 on disk, {sum(p.stat().st_size for p in model.glob('*.safetensors')) / 1e9:.2f} GB; "
          f"float32 in memory), --device cpu, {args.runs} runs each, median\n")
    print("| command | wall s | peak RSS MiB | peak own memory (RssAnon) MiB |")
    print("|---|---|---|---|")
    medians = {name: tuple(statistics.median(run[i] for run in runs) for i in range(3)) for name, runs in results.items()}
    for name, (wall, rss, anonymous) in medians.items():
        print(f"| {name} | {wall:.2f} | {rss / 2**20:.0f} | {anonymous / 2**20:.0f} |")
    for job in jobs:
        free, capped = medians[job], medians[f"{job} --max-memory {args.cap}"]
        print(f"\n{job}: capped / uncapped wall {capped[0] / free[0]:.2f}, own memory {capped[2] / free[2]:.2f}", end="")
    print()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
