"""The drop comparison of docs/analyze.md: held-out perplexity of the demo base model with N layers
dropped as `surgery analyze --suggest drop=N` chooses them, against the last N layers and random
choices (the mean of 5 seeds).

    python benchmarks/analyze_drop.py [--max-tokens 8192]

The suggestion is measured on builtin:mixed-dev (32 rows of 256 tokens, a quarter more held out
for choosing); every chain is then scored on builtin:mixed-heldout, text the choice never saw.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

import yaml

from surgery.analysis.measure import analyze
from surgery.analysis.suggestions import suggest_drop
from surgery.demo_models import demo_model
from surgery.evaluation.run import EvalSettings, evaluate
from surgery.pipeline import apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()
    settings = EvalSettings(data=("builtin:mixed-heldout",), max_tokens=args.max_tokens, device="cpu", dtype="float32")
    base = demo_model("base")
    session = analyze(str(base), ["builtin:mixed-dev"], 32, 256, "cpu")
    depth = len(session.analysis.layers)

    with tempfile.TemporaryDirectory() as tmp:
        def score(kept: list[int]) -> float:
            plan = Path(tmp) / "plan.yaml"
            plan.write_text(f"model: {base}\noutput: {Path(tmp) / 'out'}\nsteps:\n  - op: chain\n    layers: {kept}\n")
            return evaluate(apply(plan, device="cpu", force=True, fsync=False).output, settings).perplexity

        print(f"held-out mixed text, {args.max_tokens} tokens; all {depth} layers: {score(list(range(depth))):.1f}\n")
        print("| dropped | suggested (layers) | last N | random, mean of 5 (min-max) |")
        print("|---|---|---|---|")
        for count in (1, 2, 3):
            suggestion = suggest_drop(session, count, depth, lambda line: None)
            kept = [i for part in yaml.safe_load(suggestion.plan)["steps"][0]["layers"] for i in _expand(part)]
            dropped = sorted(set(range(depth)) - set(kept))
            randoms = []
            for seed in range(5):
                gone = set(random.Random(seed).sample(range(depth), count))
                randoms.append(score([i for i in range(depth) if i not in gone]))
            print(f"| {count} | {score(kept):.1f} ({', '.join(map(str, dropped))}) | {score(list(range(depth - count))):.1f} "
                  f"| {statistics.mean(randoms):.1f} ({min(randoms):.1f}-{max(randoms):.1f}) |")


def _expand(part: int | str) -> list[int]:
    if isinstance(part, int):
        return [part]
    start, stop = (int(x) for x in part.split("-"))
    return list(range(start, stop + 1))


if __name__ == "__main__":
    main()
