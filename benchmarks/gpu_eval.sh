#!/usr/bin/env bash
# Throughput of `surgery eval` on a ~1.1B random Llama (TinyLlama shape), and the model FLOP
# utilisation it implies: 2 x parameters x tokens/s over the card's dense bf16 peak.
#
#   benchmarks/gpu_eval.sh [DEVICE] [MAX_TOKENS]      # defaults: cuda 65536
#   benchmarks/gpu_eval.sh cpu 1024                   # the same script, ready-checked on CPU
#
# Needs no network: the checkpoint and its tokenizer are generated locally. Writes the eval JSON
# and a one-line summary under $OUT (default: bench-data/gpu-eval).
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
max_tokens="${2:-65536}"
batch="${BATCH:-8}"
window="${WINDOW:-2048}"
data="${DATA:-bench-data}"
out="${OUT:-$data/gpu-eval}"
mkdir -p "$out"
. benchmarks/gpu_prepare.sh
model="$(python benchmarks/make_checkpoint.py "$data/tinyllama-1.1b-random" --tokenizer)"
python -m surgery eval "$model" --no-compare --device "$device" --window "$window" --stride "$window" \
    --max-tokens "$max_tokens" --batch-size "$batch" --json > "$out/eval.json"
python - "$out/eval.json" <<'PY' | tee "$out/summary.txt"
import json, sys
import torch
report = json.load(open(sys.argv[1]))
# dense bf16 peaks (no sparsity), TFLOP/s; PEAK_TFLOPS overrides
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
name = torch.cuda.get_device_name() if report["device"].startswith("cuda") else "cpu"
import os
peak = float(os.environ.get("PEAK_TFLOPS", 0)) or next((v for k, v in PEAKS.items() if k in name), 0.0)
flops = 2 * report["parameters"] * report["tokens_per_second"]
mfu = f"{100 * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s" if peak else "n/a (unknown peak)"
print(f"{name}: {report['parameters']:,} params, {report['dtype']}, window {report['window']}, "
      f"batch {os.environ.get('BATCH', 8)}: {report['tokens_per_second']:,.0f} tokens/s, "
      f"{flops / 1e12:.1f} TFLOP/s, MFU {mfu}")
PY
