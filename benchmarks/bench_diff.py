"""`surgery diff` against the time to read both checkpoints once (`cat A/* B/* > /dev/null`).

    python benchmarks/bench_diff.py [--data bench-data] [--runs 3]

A is the 1.1B random TinyLlama-shaped checkpoint of make_checkpoint.py; B1 is a "fine-tune" of it
(every tensor plus small noise: every tensor changed, statistics computed for all); B2 is the
drop-layers-8-11 chain output (every tensor identical to one of A's: byte comparisons only).
Besides the command, the same diff called from Python (`surgery.comparison.report.diff`, interpreter
start included; also with the numpy fallback an install without a C compiler gets), and the
command's fixed start-up: `surgery diff` of the 6-layer test Llama with itself (1 MB).
The package is byte-compiled first, as an installed one is.
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
from make_checkpoint import generate

import surgery
from surgery.demo_models import demo_model


def fine_tune(base: Path, folder: Path) -> Path:
    """base + N(0, 0.001^2) on every tensor, shard by shard (bounded memory)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import load_file, save_file

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging, ignore=shutil.ignore_patterns("*.safetensors"))
    generator = torch.Generator().manual_seed(1)
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(shard)
        noisy = {k: (v.float() + 0.001 * torch.randn(v.shape, generator=generator)).to(v.dtype) for k, v in tensors.items()}
        save_file(noisy, staging / shard.name, metadata={"format": "pt"})
    staging.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data.resolve()
    base, tuned, dropped = (data / f"tinyllama-1.1b-random{s}" for s in ("", "-ft", "-drop"))
    if not args.prepare_only:
        # in a child: a forked child's peak RSS starts at its parent's, which must stay small
        subprocess.run([sys.executable, __file__, "--data", str(data), "--prepare-only"], check=True)
        return measure_all(base, tuned, dropped, args.runs)
    generate(base)
    fine_tune(base, tuned)
    demo_model("tiny-llama")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(surgery.__file__).parent)], check=True)
    if not dropped.exists():
        work = Path(tempfile.mkdtemp(dir=data))
        (work / "plan.yaml").write_text(f"model: {base}\noutput: {dropped}\nsteps:\n  - op: chain\n    layers: [0-7, 12-21]\n")
        subprocess.run([sys.executable, "-m", "surgery", "apply", str(work / "plan.yaml")], check=True, capture_output=True)
        shutil.rmtree(work)


def measure_all(base: Path, tuned: Path, dropped: Path, runs: int) -> None:
    surgery_diff = [sys.executable, "-m", "surgery", "diff", "--json"]
    library = "import json, sys; from surgery.comparison.report import diff; json.dumps(diff(*sys.argv[1:]).to_dict())"
    fallback = "import surgery.comparison.stats as s; s.fused_measure = None; " + library  # as installed without a compiler
    shards = lambda folder: [str(p) for p in sorted(folder.glob("*.safetensors"))]  # noqa: E731
    commands = {
        "cat A B1 (read both once)": ["sh", "-c", f"cat {' '.join(shards(base) + shards(tuned))} > /dev/null"],
        "surgery diff A B1 (fine-tune)": surgery_diff + [str(base), str(tuned)],
        "diff(A, B1) from Python": [sys.executable, "-c", library, str(base), str(tuned)],
        "diff(A, B1) from Python, numpy fallback": [sys.executable, "-c", fallback, str(base), str(tuned)],
        "cat A B2 (read both once)": ["sh", "-c", f"cat {' '.join(shards(base) + shards(dropped))} > /dev/null"],
        "surgery diff A B2 (drop 8-11)": surgery_diff + [str(base), str(dropped)],
        "diff(A, B2) from Python": [sys.executable, "-c", library, str(base), str(dropped)],
        "surgery diff of a 1 MB model with itself (start-up)": surgery_diff + [str(demo_model("tiny-llama"))] * 2,
    }
    for cmd in commands.values():  # warm the page cache
        subprocess.run(cmd, check=True, capture_output=True)
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            results[name].append(timed(cmd))
    print(f"{runs} runs each, median, page cache warm\n")
    print("| command | wall s | peak RSS MiB | x reading both |")
    print("|---|---|---|---|")
    floors = {"B1": "cat A B1 (read both once)", "B2": "cat A B2 (read both once)"}
    medians = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
    for name, runs in results.items():
        floor = next((f for key, f in floors.items() if key in name), None)
        ratio = f"{medians[name] / medians[floor]:.2f}" if floor else ""
        rss = statistics.median(r for _, r in runs) / 2**20
        print(f"| {name} | {medians[name]:.2f} | {rss:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
