"""RTN, GPTQ and PTQTP side by side on one model (docs/quantization.md): for each width, every layer at
that width, asymmetric, in groups, by RTN and GPTQ (plain, with activation order, with RSQ's token
importance, and all of RSQ: `rotate` first); then PTQTP's two trit-planes (one format, whatever the
width). Held-out perplexity, KL divergence to the unquantized model's next-token distribution and top-1
agreement with it, the bits each layer-matrix weight takes with its scales (and zero points), GPTQ's layer
output error relative to RTN's, and wall time.

    python benchmarks/quantizers.py [--model PATH] [--widths 2,3,4] [--group-size 32] [--max-tokens 8192]

Calibration: builtin:mixed-dev, 32 samples of 256 tokens; scoring: builtin:mixed-heldout. The fits
cache is a fresh temporary folder, so every GPTQ run calibrates (its time is the whole job).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from quant_scores import Scorer, apply_bits, apply_step

from surgery.checkpoint.reader import DTYPE_SIZES, Checkpoint
from surgery.demo_models import demo_model

METHODS = {"RTN": "method: rtn", "GPTQ": "method: gptq", "GPTQ, act order": "method: gptq, act_order: true",
           "GPTQ, RSQ token importance": "method: gptq, token_importance: attention",
           "RSQ (rotate, then GPTQ with token importance)": "method: gptq, token_importance: attention"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a model folder [the demo base model]")
    parser.add_argument("--widths", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()
    base = args.model or demo_model("base")
    score = Scorer(base, args.max_tokens)
    print(f"model {base}; unquantized perplexity {score.base_perplexity:.2f} on {args.max_tokens} held-out tokens\n")
    print(f"| width | quantizer | {Scorer.HEADER} | bits per matrix weight | layer output error / RTN's (median) "
          "| apply time |")
    print("|---|---|---|---|---|---|---|---|")
    source_bits = 8 * DTYPE_SIZES[next(iter(Checkpoint.open(base).tensors.values())).dtype]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SURGERY_CACHE"] = str(work / "cache")  # the demo model's path is resolved already
        rotated = apply_step(work, base, "  - op: rotate\n", "rotated")
        for width in [int(w) for w in args.widths.split(",")]:
            for name, method in METHODS.items():
                start = time.perf_counter()
                out = apply_bits(work, rotated if name.startswith("RSQ") else base, f"    width: {width}\n"
                                 "    calibration: {data: builtin:mixed-dev, samples: 32, seq_len: 256}\n"
                                 f"    quantizer: {{{method}, group_size: {args.group_size}}}\n")
                seconds = time.perf_counter() - start
                fit = json.loads((out / "surgery.json").read_text())["fits"][0].get("gptq")
                ratio = "1" if fit is None else f"{statistics.median(g / r for g, r in zip(fit['output_error']['gptq'], fit['output_error']['rtn'])):.3f}"
                bits = width + (source_bits + 8) / args.group_size  # a scale in the source dtype, an 8-bit zero point
                print(f"| {width} | {name} | {score(out).cells()} | {bits:.2f} | {ratio} | {seconds:.1f} s |", flush=True)
        start = time.perf_counter()
        out = apply_step(work, base, f"  - op: ptqtp\n    group_size: {args.group_size}\n")
        seconds = time.perf_counter() - start
        bits = json.loads((out / "surgery.json").read_text())["fits"][0]["bits_per_weight"]
        print(f"| 2 x 1.58 | PTQTP | {score(out).cells()} | {bits:.2f} | | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
