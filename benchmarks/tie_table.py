"""The layer-tying table of docs/recursive.md: the demo base model (8 layers) tied into 4 shared
layers looped twice, for each init method and LoRA rank, written compact.

    python benchmarks/tie_table.py [--max-tokens 16384] [--device cpu] [--loops 2]

For each row: parameters as loaded (shared ones counted once), bytes on disk, and held-out
perplexity (mixed prose and code the models never saw).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from surgery.demo_models import demo_model
from surgery.evaluation.run import EvalSettings, evaluate
from surgery.pipeline import apply

RANKS = (None, 4, 16, 64, "full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loops", type=int, default=2)
    args = parser.parse_args()
    settings = EvalSettings(data=("builtin:mixed-heldout",), max_tokens=args.max_tokens, device=args.device, dtype="float32")
    base = demo_model("base")

    def row(label: str, folder: Path) -> None:
        report = evaluate(folder, settings)
        on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"| {label} | {report.parameters:,} | {on_disk / 2**20:.2f} | {report.perplexity:.2f} |")

    print(f"held-out mixed text, {args.max_tokens} tokens per text, float32, {args.device}\n")
    print("| model | parameters | MiB on disk | perplexity |")
    print("|---|---|---|---|")
    row("original (8 layers)", base)
    with tempfile.TemporaryDirectory() as tmp:
        for init in ("average", "stepwise", "lower"):
            for rank in RANKS:
                relax = "" if rank is None else f"    relax: {{rank: {rank}}}\n"
                plan = Path(tmp) / "plan.yaml"
                plan.write_text(f"model: {base}\noutput: {Path(tmp) / 'out'}\nsteps:\n  - op: tie\n"
                                f"    loops: {args.loops}\n    init: {init}\n{relax}")
                out = apply(plan, device=args.device, force=True, fsync=False).output
                row(f"{init}, {'no LoRA' if rank is None else f'rank {rank}'}", out)


if __name__ == "__main__":
    main()
