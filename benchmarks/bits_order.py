"""The ordering experiment of docs/quantization.md (Layer-Wise Quantization, Dumitru et al. 2024):
held-out perplexity of the demo base model when a growing fraction of its layers gets the low
width, the layers chosen by LIM order, ZD order, reverse LIM order and a random order.

    python benchmarks/bits_order.py [--max-tokens 8192] [--plot docs/bits-order.png]

Scores come from `bits` plans (score: lim on builtin:mixed-dev, score: zd); each point is then
a `score: manual` plan giving the low width to the first round(f * L) layers of the order, RTN
asymmetric in groups of 32, written dense and scored on held-out mixed text.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from surgery import pipeline
from surgery.demo_models import demo_model
from surgery.evaluation.run import EvalSettings, evaluate

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
QUANTIZER = "    quantizer: {group_size: 32, symmetric: false}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    settings = EvalSettings(data=("builtin:mixed-heldout",), max_tokens=args.max_tokens, device="cpu", dtype="float32")
    base = demo_model("base")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def apply(step: str) -> Path:
            plan = work / "plan.yaml"
            plan.write_text(f"model: {base}\noutput: {work / 'out'}\nsteps:\n  - op: bits\n{step}{QUANTIZER}")
            return pipeline.apply(plan, device="cpu", force=True, fsync=False).output

        def scores(score: str) -> list[float]:
            out = apply(f"    score: {score}\n    calibration: {{data: builtin:mixed-dev}}\n"
                        "    assign: {high: 8, low: 4, low_fraction: 0.5}\n")
            return json.loads((out / "surgery.json").read_text())["fits"][0]["scores"]

        lim, zd = scores("lim"), scores("zd")
        depths = len(lim)
        ranked = lambda values: sorted(range(depths), key=lambda i: (values[i], i))  # noqa: E731
        shuffled = list(range(depths))
        random.Random(0).shuffle(shuffled)
        orders = {"LIM": ranked(lim), "ZD": ranked(zd), "reverse LIM": ranked(lim)[::-1], "random (seed 0)": shuffled}
        print(f"LIM scores: {[round(s, 4) for s in lim]}\nZD scores: {[round(s, 4) for s in zd]}\n")
        results: dict[tuple[int, int], dict[str, list[float]]] = {}
        for high, low in ((4, 2), (8, 3)):
            table = results.setdefault((high, low), {})
            for name, order in orders.items():
                row = []
                for fraction in FRACTIONS:
                    chosen = set(order[: round(fraction * depths)])
                    manual = ", ".join(f"{i}: {low if i in chosen else high}" for i in range(depths))
                    out = apply(f"    score: manual\n    manual: {{{manual}}}\n")
                    row.append(evaluate(out, settings).perplexity)
                table[name] = row
            print(f"{high}/{low} bits: perplexity by fraction of layers at {low} bits, held-out mixed text, "
                  f"{args.max_tokens} tokens\n")
            print("| order | " + " | ".join(f"{f:g}" for f in FRACTIONS) + " |")
            print("|---|" + "---|" * len(FRACTIONS))
            for name, row in table.items():
                print(f"| {name} | " + " | ".join(f"{p:.1f}" for p in row) + " |")
            print()
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
        for axis, ((high, low), table) in zip(axes, results.items()):
            for name, row in table.items():
                axis.plot(FRACTIONS, row, marker="o", label=name)
            axis.set(title=f"{high}/{low} bits", xlabel=f"fraction of layers at {low} bits", ylabel="perplexity")
            axis.set_yscale("log")
            axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
