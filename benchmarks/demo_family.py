"""What the trained demo models are like: each one's held-out perplexity, and what dropping each
layer of the base, or swapping each adjacent pair, costs.

    python benchmarks/demo_family.py [--max-tokens 4096]

Builds the demo models if needed; every edit is a `chain` plan applied with `surgery`, every score
on the first N tokens of the held-out texts (the texts `surgery demo` scores on; no model saw them).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from surgery.demo_models import demo_model
from surgery.demo_models.models import DEMO_CONFIG
from surgery.evaluation.run import EvalSettings, evaluate
from surgery.pipeline import apply

DATA = ("builtin:prose-heldout", "builtin:code-heldout", "builtin:mixed-heldout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args()
    settings = EvalSettings(data=DATA, max_tokens=args.max_tokens, device="cpu", dtype="float32")
    models = {name: demo_model(name) for name in ("base", "prose", "code")}

    def scores(folder: Path) -> list[float]:
        return [d.perplexity for d in evaluate(folder, settings).datasets]

    print(f"held-out perplexity, first {args.max_tokens} tokens of each text\n")
    print("| model | prose | code | mixed |\n|---|---|---|---|")
    for name, folder in models.items():
        print(f"| {name} | " + " | ".join(f"{s:.1f}" for s in scores(folder)) + " |")
    base = scores(models["base"])
    depth = DEMO_CONFIG["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        def edited(layers: list[int]) -> list[float]:
            plan = Path(tmp) / "plan.yaml"
            plan.write_text(f"model: {models['base']}\noutput: {Path(tmp) / 'out'}\nsteps:\n  - op: chain\n"
                            f"    layers: {layers}\n")
            return scores(apply(plan, device="cpu", force=True, fsync=False).output)

        def row(label: str, got: list[float]) -> str:
            cells = (f"{s:.1f} ({100 * (s / b - 1):+.1f}%)" for s, b in zip(got, base))
            return f"| {label} | " + " | ".join(cells) + " |"

        print("\n| base edited | prose | code | mixed |\n|---|---|---|---|")
        for layer in range(depth):
            print(row(f"drop layer {layer}", edited([i for i in range(depth) if i != layer])))
        for layer in range(depth - 1):
            order = list(range(depth))
            order[layer], order[layer + 1] = layer + 1, layer
            print(row(f"swap {layer} and {layer + 1}", edited(order)))


if __name__ == "__main__":
    main()
