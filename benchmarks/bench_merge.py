"""Side-by-side timing of `surgery apply` task-vector merges against mergekit (when installed).

    python benchmarks/bench_merge.py [--data bench-data] [--runs 3] [--mergekit PATH/mergekit-yaml] [--threads 2]
                                     [--device cpu] [--baseline OTHER-CHECKOUT]

Generates (once) the ~1.1B-parameter random bf16 Llama of bench_chain.py and two noisy variants of
it (fine-tune stand-ins), then times base + 2 variants merged with task_arithmetic (weights 0.5) and
with ties (density 0.5, weights 0.5) --runs times each, interleaved, page cache warm, and prints
the median wall time and peak RSS of each command, and mergekit / surgery.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_chain import surgery_at, timed

MERGES = {
    "task_arithmetic": ("", ""),
    "ties density 0.5": ("\n    density: 0.5", ", density: 0.5"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml to compare with")
    parser.add_argument("--device", default="cpu", help="surgery's --device (cuda: arithmetic on the GPU)")
    parser.add_argument("--threads", type=int, default=2, help="mergekit's -j (2 was its fastest here)")
    parser.add_argument("--baseline", type=Path, help="another checkout of surgery (e.g. a `git worktree` of an older "
                        "commit) to time beside this one, with the same Python")
    args = parser.parse_args()
    data = args.data.resolve()
    base, variants = data / "tinyllama-1.1b-random", [data / f"tinyllama-1.1b-noisy{seed}" for seed in (1, 2)]
    # generated in a child process: a child forked from a parent holding tensors would report the
    # parent's pages as its own peak RSS
    subprocess.run([sys.executable, "-c", f"from make_checkpoint import generate, noisy_variant\n"
                    f"base = generate({str(base)!r})\n"
                    + "".join(f"noisy_variant(base, {str(v)!r}, {seed})\n" for seed, v in zip((1, 2), variants))],
                   cwd=Path(__file__).parent, check=True)
    work = Path(tempfile.mkdtemp(dir=data))
    commands: dict[str, tuple[list[str], Path]] = {
        "cat base + variants": (["sh", "-c", f"cat {base}/*.safetensors {variants[0]}/*.safetensors "
                                             f"{variants[1]}/*.safetensors > /dev/null"], work / "none"),
    }
    for label, (ours, theirs) in MERGES.items():
        op = label.split()[0]
        plan = work / f"{op}.yaml"
        models = "".join(f"\n      - {{model: {v}, weight: 0.5}}" for v in variants)
        plan.write_text(f"base: {base}\noutput: {work / 'out'}\nsteps:\n  - op: {op}{ours}\n    models:{models}\n")
        surgery = [sys.executable, "-m", "surgery", "apply", str(plan), "--no-fsync", "--device", args.device]
        commands[f"surgery {label}"] = (surgery, work / "out")
        if args.baseline:
            commands[f"baseline {label}"] = ([*surgery_at(args.baseline), *surgery[3:]], work / "out")
        if args.mergekit:
            mk = work / f"mk-{op}.yaml"
            entries = "".join(f"\n  - model: {v}\n    parameters: {{weight: 0.5{theirs}}}" for v in variants)
            mk.write_text(f"merge_method: {op}\nbase_model: {base}\nmodels:{entries}\ndtype: bfloat16\n")
            mk_cmd = [args.mergekit, str(mk), str(work / "mk"), "--no-copy-tokenizer", "--quiet", "-j", str(args.threads)]
            commands[f"mergekit {label} -j {args.threads}"] = (mk_cmd, work / "mk")
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift in the machine's state hits every command alike
        for name, (cmd, cleanup) in commands.items():
            results[name].append(timed(cmd, cleanup))
    medians = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
    print(f"base {base} + 2 noisy variants (bf16, {sum(p.stat().st_size for p in base.glob('*.safetensors')) / 1e9:.2f} "
          f"GB each), surgery --device {args.device}, {args.runs} runs each, median; `sync` (untimed) before every run\n")
    print("| command | wall s | peak RSS MiB |")
    print("|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {medians[name]:.2f} | {statistics.median(r for _, r in runs) / 2**20:.0f} |")
    for label in MERGES:
        if f"baseline {label}" in medians:
            print(f"\nsurgery / baseline, {label}: {medians[f'surgery {label}'] / medians[f'baseline {label}']:.2f}", end="")
        theirs = medians.get(f"mergekit {label} -j {args.threads}")
        if theirs:
            print(f"\nmergekit / surgery, {label}: {theirs / medians[f'surgery {label}']:.1f}x", end="")
    print()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
