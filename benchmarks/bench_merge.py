"""Side-by-side timing of every merge method on a 1.1B checkpoint: one mergekit config per method, run as
it is by `surgery apply CONFIG --out` and by mergekit's `mergekit-yaml` (when installed).

    python benchmarks/bench_merge.py [--data bench-data] [--runs 3] [--mergekit PATH/mergekit-yaml] [--threads 2]
                                     [--device cpu] [--methods task_arithmetic,ties] [--baseline OTHER-CHECKOUT]

Generates (once) the ~1.1B-parameter random bf16 Llama of bench_chain.py and two noisy variants of
it (fine-tune stand-ins), then times base + 2 variants merged by each method (weights 0.5, density 0.5
where the method trims) --runs times each, interleaved, page cache warm, and prints the median wall time
and peak RSS of each command, and mergekit / surgery. `--baseline` times another checkout beside this
one (it must read mergekit configs: 8a31344 or later).
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

TRIM = "weight: 0.5, density: 0.5"
MERGES = {  # method: (its parameters, per model; the shared ones)
    "task_arithmetic": ("weight: 0.5", ""),
    "ties": (TRIM, ""),
    "dare_ties": (TRIM, ""),
    "dare_linear": (TRIM, ""),
    "breadcrumbs": (TRIM, ""),
    "breadcrumbs_ties": (TRIM, ""),
    "della": (TRIM, ""),
    "della_linear": (TRIM, ""),
    "sce": ("", "\nparameters: {select_topk: 0.5}"),
    "linear": ("weight: 0.5", ""),
    "slerp": ("", "\nparameters: {t: 0.5}"),
    "nuslerp": ("weight: 0.5", ""),
    "multislerp": ("weight: 0.5", ""),
    "karcher": ("", ""),
    "model_stock": ("", ""),
}


def config(method: str, base: Path, variants: list[Path]) -> str:
    """The mergekit config: base_model and the variants (slerp: the base and one variant; linear and karcher
    merge the variants themselves, with no base)."""
    own, shared = MERGES[method]
    merged = [base, variants[0]] if method == "slerp" else variants
    entries = "".join(f"\n  - model: {v}" + (f"\n    parameters: {{{own}}}" if own else "") for v in merged)
    head = "" if method in ("linear", "karcher") else f"\nbase_model: {base}"
    return f"merge_method: {method}{head}\nmodels:{entries}{shared}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml to compare with")
    parser.add_argument("--device", default="cpu", help="surgery's --device (cuda: arithmetic on the GPU)")
    parser.add_argument("--threads", type=int, default=2, help="mergekit's -j (2 was its fastest here)")
    parser.add_argument("--baseline", type=Path, help="another checkout of surgery (e.g. a `git worktree` of an older "
                        "commit) to time beside this one, with the same Python")
    parser.add_argument("--methods", default=",".join(MERGES), help="comma-separated mergekit merge methods")
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
    for method in args.methods.split(","):
        mk = work / f"{method}.yaml"  # the same file for both tools
        mk.write_text(config(method, base, variants) + "\ndtype: bfloat16\n")
        surgery = [sys.executable, "-m", "surgery", "apply", str(mk), "--out", str(work / "out"), "--no-fsync",
                   "--device", args.device]
        commands[f"surgery {method}"] = (surgery, work / "out")
        if args.baseline:
            commands[f"baseline {method}"] = ([*surgery_at(args.baseline), *surgery[3:]], work / "out")
        if args.mergekit:
            mk_cmd = [args.mergekit, str(mk), str(work / "mk"), "--no-copy-tokenizer", "--quiet", "-j", str(args.threads)]
            commands[f"mergekit {method} -j {args.threads}"] = (mk_cmd, work / "mk")
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
    for label in args.methods.split(","):
        if f"baseline {label}" in medians:
            print(f"\nsurgery / baseline, {label}: {medians[f'surgery {label}'] / medians[f'baseline {label}']:.2f}", end="")
        theirs = medians.get(f"mergekit {label} -j {args.threads}")
        if theirs:
            print(f"\nmergekit / surgery, {label}: {theirs / medians[f'surgery {label}']:.1f}x", end="")
    print()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
