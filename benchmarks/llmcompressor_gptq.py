"""llm-compressor's GPTQ on one model, for benchmarks/gptq_vs_llmcompressor.py. Runs in llm-compressor's
own venv (never surgery's): reads the calibration token rows surgery uses from a JSON file, quantizes every
Linear but lm_head, symmetric int in groups, sequential pipeline, and saves the compressed model.

    LLMC_PYTHON benchmarks/llmcompressor_gptq.py MODEL ROWS.json OUT --bits 4 --group-size 32
"""

from __future__ import annotations

import argparse
import json

from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("rows")
    parser.add_argument("out")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args()
    rows = json.load(open(args.rows))
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    scheme = {"targets": ["Linear"], "weights": {"num_bits": args.bits, "type": "int", "symmetric": True,
                                                 "strategy": "group", "group_size": args.group_size}}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    oneshot(model=args.model, dataset=dataset, recipe=recipe, num_calibration_samples=len(rows),
            max_seq_length=len(rows[0]), shuffle_calibration_samples=False, pipeline="sequential",
            output_dir=args.out, save_compressed=True)


if __name__ == "__main__":
    main()
