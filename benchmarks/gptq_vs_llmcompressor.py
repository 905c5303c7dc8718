"""surgery's GPTQ beside llm-compressor's on the same model, width, group size and calibration tokens
(docs/quantization.md): held-out perplexity, KL to the unquantized model and top-1 agreement (both outputs
scored by the same code), wall time and peak memory of each tool's whole run, side by side in one run, and
how many quantized weights the two outputs share.

    python benchmarks/gptq_vs_llmcompressor.py --llmcompressor /tmp/lc-venv/bin/python [--model PATH]
        [--bits 4] [--group-size 32] [--runs 3]

llm-compressor runs in its own venv (python3 -m venv /tmp/lc-venv; /tmp/lc-venv/bin/pip install
torch==2.13.0 llmcompressor) through benchmarks/llmcompressor_gptq.py. Both tools: symmetric integers in
groups, activation order with contiguous groups (llm-compressor's default "static"; surgery's
act_order: true), dampening 0.01, blocks of 128, lm_head and embeddings left as they are, 32 rows of
256 tokens of builtin:mixed-dev, on the CPU. surgery's fits cache is a fresh folder, so it calibrates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quant_scores import Scorer

from surgery.demo_models import demo_model
from surgery.evaluation.data import load_text
from surgery.evaluation.importance import calibration_batches

HERE = Path(__file__).resolve().parent


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of one command, its children included."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{command[0]} failed:\n{process.stderr.read()[-3000:] if process.stderr else ''}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmcompressor", required=True, help="the python of llm-compressor's venv")
    parser.add_argument("--model", type=Path, default=None, help="a model folder [the demo base model]")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool, alternating: median time, peak memory")
    args = parser.parse_args()
    base = (args.model or demo_model("base")).resolve()
    score = Scorer(base, args.max_tokens)
    rows = calibration_batches(score.reference.tokenizer, load_text("builtin:mixed-dev").text, 32, 256, "benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rows.json").write_text(json.dumps(rows.tolist()))
        plan = work / "plan.yaml"
        plan.write_text(f"model: {base}\noutput: {work / 'surgery'}\nsteps:\n  - op: bits\n    width: {args.bits}\n"
                        "    calibration: {data: builtin:mixed-dev, samples: 32, seq_len: 256}\n"
                        f"    quantizer: {{method: gptq, group_size: {args.group_size}, symmetric: true, "
                        "act_order: true}\n    format: compressed-tensors\n")
        commands = {
            "surgery": [sys.executable, "-m", "surgery", "apply", str(plan), "--device", "cpu", "--force"],
            "llm-compressor": [args.llmcompressor, str(HERE / "llmcompressor_gptq.py"), str(base),
                               str(work / "rows.json"), str(work / "llm-compressor"), "--bits", str(args.bits),
                               "--group-size", str(args.group_size)],
        }
        measured: dict[str, list[tuple[float, float]]] = {tool: [] for tool in commands}
        for run in range(args.runs):  # alternating, each surgery run with a fresh fits cache
            for tool, command in commands.items():
                env = os.environ | {"SURGERY_CACHE": str(work / f"cache-{run}"), "CUDA_VISIBLE_DEVICES": ""}
                measured[tool].append(timed(command, env))
        runs = {tool: (statistics.median(t for t, _ in m), max(p for _, p in m)) for tool, m in measured.items()}
        print(f"model {base}; {args.bits} bits, groups of {args.group_size}, symmetric, activation order; "
              f"unquantized perplexity {score.base_perplexity:.2f} on {args.max_tokens} held-out tokens\n")
        print(f"| tool | {Scorer.HEADER} | wall time (median of {args.runs}) | peak memory |")
        print("|---|---|---|---|---|---|")
        for tool, (seconds, peak) in runs.items():
            print(f"| {tool} | {score(work / tool).cells()} | {seconds:.1f} s | {peak:.0f} MiB |", flush=True)
        same, total = same_weights(work / "surgery", work / "llm-compressor")
        print(f"\n{same / total:.4%} of the {total:,} quantized layer weights are equal in the two outputs")


def same_weights(one: Path, other: Path) -> tuple[int, int]:
    """How many of the layer matrices' weights the two outputs store alike, as transformers loads them."""
    from surgery.evaluation.loading import load_for_eval

    first = dict(load_for_eval(one, "cpu", "float32").model.named_parameters())
    second = dict(load_for_eval(other, "cpu", "float32").model.named_parameters())
    matrices = [n for n, w in first.items() if ".layers." in n and w.dim() == 2]
    return (sum(int((first[n] == second[n]).sum()) for n in matrices), sum(first[n].numel() for n in matrices))


if __name__ == "__main__":
    main()
