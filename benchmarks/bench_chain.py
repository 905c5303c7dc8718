"""Side-by-side timing of `surgery apply` chain edits against `cp -r` (and mergekit when installed).

    python benchmarks/bench_chain.py [--data bench-data] [--runs 5] [--mergekit PATH/mergekit-yaml]

Generates (once) a ~1.1B-parameter random Llama checkpoint in bf16 with TinyLlama's shape, split
into several shards, then times each command --runs times (page cache warm) and prints the
median wall time and peak RSS of each, with the ratio to `cp` of the same number of bytes. Runs of
the same plan reuse the structure check passed by the untimed warm-up run (as `check` then `apply`
does); the "first run" rows start from an empty cache, so they pay for the check.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], cleanup: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run of a command; its output folder, if any, is removed after.

    Dirty pages are flushed (untimed) before each run, so every command starts from the same state.
    """
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    return elapsed, usage.ru_maxrss * 1024


def surgery_at(checkout: Path) -> list[str]:
    """The `surgery` command of another checkout (e.g. a `git worktree` of an older commit), run with
    this Python: that checkout's package goes first on sys.path, ahead of the installed one."""
    start = f"import sys; sys.path.insert(0, {str(checkout.resolve())!r}); from surgery.cli import main; main()"
    return [sys.executable, "-c", start]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml to compare with")
    parser.add_argument("--baseline", type=Path, help="another checkout of surgery (e.g. a `git worktree` of an older "
                        "commit) to time beside this one, with the same Python")
    args = parser.parse_args()
    # generated in its own process: a child forked from this one after it held the checkpoint's tensors
    # would report their pages as its own peak RSS
    model = args.data.resolve() / "tinyllama-1.1b-random"
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_checkpoint.py")), str(model)], check=True,
                   stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(dir=args.data.resolve()))
    os.environ["SURGERY_CACHE"] = str(work / "cache")  # the structure check the warm-up run passes is remembered here
    surgery = [sys.executable, "-m", "surgery", "apply"]
    edits = {"drop 8-11": "[0-7, 12-21]", "loop [0-11, 6-21]": "[0-11, 6-21]"}
    # name -> (command, output folder, the floor it is compared with)
    commands: dict[str, tuple[list[str], Path, str]] = {
        "cp -r": (["cp", "-r", str(model), str(work / "cp")], work / "cp", "cp -r"),
        "cp -r; sync": (["sh", "-c", f"cp -r {model} {work / 'cp'} && sync"], work / "cp", "cp -r; sync"),
    }
    out_bytes: dict[str, int] = {}
    for label, layers in edits.items():
        plan = work / f"{len(commands)}.yaml"
        plan.write_text(f"model: {model}\noutput: {work / 'out'}\nsteps:\n  - op: chain\n    layers: {layers}\n")
        commands[f"surgery {label}"] = (surgery + [str(plan)], work / "out", "cp -r; sync")
        commands[f"surgery {label} --no-fsync"] = (surgery + [str(plan), "--no-fsync"], work / "out", "cp -r")
        first = f"rm -rf {work / 'fresh'}; SURGERY_CACHE={work / 'fresh'} exec {' '.join(surgery)} {plan} --no-fsync"
        commands[f"surgery {label} --no-fsync, first run"] = (["sh", "-c", first], work / "out", "cp -r")
        if args.baseline:
            baseline = [*surgery_at(args.baseline), "apply", str(plan)]
            commands[f"baseline {label}"] = (baseline, work / "out", "cp -r; sync")
            commands[f"baseline {label} --no-fsync"] = (baseline + ["--no-fsync"], work / "out", "cp -r")
        if args.mergekit:
            mk = work / f"mk{len(commands)}.yaml"
            ranges = [r.split("-") for r in layers.strip("[]").split(", ")]
            slices = "\n".join(
                f"  - sources:\n      - model: {model}\n        layer_range: [{a}, {int(b) + 1}]" for a, b in ranges
            )
            mk.write_text(f"slices:\n{slices}\nmerge_method: passthrough\ndtype: bfloat16\n")
            mk_cmd = [args.mergekit, str(mk), str(work / "mk"), "--no-copy-tokenizer", "--quiet"]
            commands[f"mergekit {label}"] = (mk_cmd, work / "mk", "cp -r")
        subprocess.run(surgery + [str(plan), "--no-fsync"], check=True, capture_output=True)
        out_bytes[label] = folder_bytes(work / "out")
        shutil.rmtree(work / "out")
    subprocess.run(["cat", *map(str, model.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm cache
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift in the machine's state hits every command alike
        for name, (cmd, cleanup, _) in commands.items():
            results[name].append(timed(cmd, cleanup))
    in_bytes = folder_bytes(model)
    medians = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
    print(f"checkpoint: {model} ({in_bytes / 1e9:.2f} GB, {len(list(model.glob('*.safetensors')))} shards), "
          f"{args.runs} runs each, median; `sync` (untimed) before every run\n")
    print("| command | wall s | peak RSS MiB | output GB | floor | x floor for the same bytes |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        floor = commands[name][2]
        label = next((lbl for lbl in edits if lbl in name), None)
        nbytes = out_bytes[label] if label else in_bytes
        rss = statistics.median(r for _, r in runs) / 2**20
        ratio = medians[name] / (medians[floor] * nbytes / in_bytes)
        print(f"| {name} | {medians[name]:.2f} | {rss:.0f} | {nbytes / 1e9:.2f} | {floor} | {ratio:.2f} |")
    for label in edits:
        if f"baseline {label}" in medians:
            print(f"\nsurgery / baseline, {label}: {medians[f'surgery {label}'] / medians[f'baseline {label}']:.2f} (fsync), "
                  f"{medians[f'surgery {label} --no-fsync'] / medians[f'baseline {label} --no-fsync']:.2f} (--no-fsync)", end="")
        if f"mergekit {label}" in medians:
            speedup = medians[f"mergekit {label}"] / medians[f"surgery {label} --no-fsync"]
            durable = medians[f"mergekit {label}"] / medians[f"surgery {label}"]
            print(f"\nmergekit / surgery, {label}: {speedup:.1f}x (--no-fsync), {durable:.1f}x (fsync)", end="")
    print()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
