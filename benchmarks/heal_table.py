"""The healing tables of docs/heal.md and docs/recursive.md: the demo base model (8 layers) tied into 4
shared layers looped twice (each init, LoRA ranks 8, 32 and 128) and with its least important layers
dropped, each scored before and after `heal`, beside the original.

    python benchmarks/heal_table.py [--steps 200] [--lr LR] [--max-tokens 16384] [--device cpu] [--drop 2]

Healing trains on builtin:mixed-dev (its defaults: KL to the teacher's top 64 log-probabilities,
AdamW cosine, lr 1e-3 for adapters alone and 1e-4 otherwise, batches of 8 x 128 tokens); every
model is scored on builtin:mixed-heldout, text neither the demo models nor the healing saw. The drop is the one `surgery analyze --suggest
drop=N` chooses, healed by its default adapters (rank 8 on every matrix) and by training all parameters.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from surgery.analysis.measure import analyze
from surgery.analysis.suggestions import suggest_drop
from surgery.demo_models import demo_model
from surgery.evaluation.run import EvalSettings, evaluate
from surgery.pipeline import apply

INITS = ("average", "stepwise", "lower")
RANKS = (8, 32, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, help="heal's lr for every row (default: heal's own default)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--drop", type=int, default=2)
    args = parser.parse_args()
    settings = EvalSettings(data=("builtin:mixed-heldout",), max_tokens=args.max_tokens, device=args.device,
                            dtype="float32")
    base = demo_model("base")
    heal = f"  - op: heal\n    data: builtin:mixed-dev\n    steps: {args.steps}\n" + (f"    lr: {args.lr}\n" if args.lr else "")
    original = evaluate(base, settings).perplexity

    with tempfile.TemporaryDirectory() as tmp:
        def run(steps: str) -> tuple[float, dict | None]:
            plan = Path(tmp) / "plan.yaml"
            plan.write_text(f"model: {base}\noutput: {Path(tmp) / 'out'}\nsteps:\n{steps}")
            out = apply(plan, device=args.device, force=True, fsync=False).output
            fits = json.loads((out / "surgery.json").read_text()).get("fits", [])
            return evaluate(out, settings).perplexity, next((f["heal"] for f in fits if "heal" in f), None)

        def row(label: str, edit: str, heal_step: str = heal) -> None:
            before, _ = run(edit)
            after, record = run(edit + heal_step)
            assert record is not None
            gap = f"{(after - original) / (before - original):.0%}" if before - original > 0.01 else "(none)"
            print(f"| {label} | {before:.2f} | {after:.2f} | {gap} | {record['parameters']:,} | "
                  f"{record['tokens']['trained']:,} | {record['seconds']:.0f} |", flush=True)

        print(f"held-out mixed text, {args.max_tokens} tokens per text, float32, {args.device}; original (8 layers) "
              f"{original:.2f}; healing: {args.steps} steps{f', lr {args.lr}' if args.lr else ''}\n")
        header = ("| model | before healing | after | gap left | parameters trained | tokens | seconds |\n"
                  "|---|---|---|---|---|---|---|")
        print(header)
        for init in INITS:
            row(f"tie, {init}, no LoRA (shared)", f"  - op: tie\n    loops: 2\n    init: {init}\n")
            for rank in RANKS:
                row(f"tie, {init}, rank {rank}", f"  - op: tie\n    loops: 2\n    init: {init}\n"
                    f"    relax: {{rank: {rank}}}\n")
        session = analyze(str(base), ["builtin:mixed-dev"], 32, 256, args.device)
        suggestion = suggest_drop(session, args.drop, len(session.analysis.layers), lambda line: None)
        kept = yaml.safe_load(suggestion.plan)["steps"][0]["layers"]
        chain = f"  - op: chain\n    layers: {json.dumps(kept)}\n"
        print(f"\ndrop {args.drop} (analyze's suggestion, kept {kept})\n")
        print(header)
        row("drop, adapters (rank 8, every matrix)", chain)
        row("drop, all parameters", chain, heal + "    train: all\n")


if __name__ == "__main__":
    main()
