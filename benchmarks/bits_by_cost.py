"""Widths chosen from measured cost beside widths chosen by rank (docs/quantization.md): for a target
average width, the assignment `score: kl` finds (the least total measured KL cost, each layer's cost
measured alone) beside LIM's and ZD's greedy ones, each scored as a whole model.

    python benchmarks/bits_by_cost.py [--model PATH] [--max-tokens 8192]

RTN, asymmetric, groups of 32, dense; calibration and cost measurement on builtin:mixed-dev
(32 x 256 tokens), scores on builtin:mixed-heldout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from quant_scores import Scorer, apply_bits

from surgery.demo_models import demo_model

TARGETS = ((3.0, [2, 4]), (2.5, [2, 3, 4]), (3.5, [2, 3, 4, 8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a model folder [the demo base model]")
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()
    base = args.model or demo_model("base")
    score = Scorer(base, args.max_tokens)
    print(f"model {base}; unquantized perplexity {score.base_perplexity:.2f} on {args.max_tokens} held-out tokens\n")
    print(f"| target (choices) | assigned by | widths by layer | {Scorer.HEADER} |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for target, choices in TARGETS:
            for by in ("lim", "zd", "kl"):
                out = apply_bits(work, base, f"    score: {by}\n    calibration: {{data: builtin:mixed-dev}}\n"
                                 f"    assign: {{target_bits: {target}, choices: {choices}}}\n"
                                 "    quantizer: {group_size: 32}\n")
                widths = json.loads((out / "surgery.json").read_text())["fits"][0]["bits"]
                print(f"| {target:g} ({', '.join(map(str, choices))}) | {by.upper()} | {widths} | {score(out).cells()} |",
                      flush=True)


if __name__ == "__main__":
    main()
