"""The ensemble table of docs/ensemble.md: the demo prose and code specialists, alone and composed
by logit averaging (`combine: logits`, the paper) and by mixing probabilities (`combine: probs`).

    python benchmarks/ensemble_table.py [--max-tokens 16384] [--device cpu]

Every model is scored on the same held-out prose, code and mixed text (never seen in training).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from surgery.demo_models import demo_model
from surgery.evaluation.run import EvalSettings, evaluate
from surgery.pipeline import apply

DATA = ("builtin:prose-heldout", "builtin:code-heldout", "builtin:mixed-heldout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    settings = EvalSettings(data=DATA, max_tokens=args.max_tokens, device=args.device, dtype="float32")
    prose, code, base = (demo_model(name) for name in ("prose", "code", "base"))

    def row(label: str, folder: Path) -> None:
        report = evaluate(folder, settings)
        scores = " | ".join(f"{d.perplexity:.1f}" for d in report.datasets)
        print(f"| {label} | {report.parameters:,} | {scores} | {report.tokens_per_second:,.0f} |")

    print(f"held-out text, {args.max_tokens} tokens per text, float32, {args.device}\n")
    print("| model | parameters | prose | code | mixed | tokens/s |")
    print("|---|---|---|---|---|---|")
    row("base (trained on both)", base)
    row("prose specialist", prose)
    row("code specialist", code)
    with tempfile.TemporaryDirectory() as tmp:
        for combine in ("logits", "probs"):
            plan = Path(tmp) / "plan.yaml"
            plan.write_text(f"output: {Path(tmp) / combine}\nsteps:\n  - op: ensemble\n    members: [{prose}, {code}]\n"
                            f"    combine: {combine}\n")
            row(f"ensemble, combine: {combine}", apply(plan, device=args.device, fsync=False).output)


if __name__ == "__main__":
    main()
