#!/usr/bin/env bash
# GPU checks of this session's ops: `bits` (RTN and GPTQ) and `tie` with --device cuda equal --device cpu,
# GPTQ under a memory cap equal to it uncapped (tests -k cuda), then the demo base model scored in float32
# on cpu and on cuda on the same machine (the perplexities must agree), with the Python version the built-in corpora come from.
#
#   benchmarks/gpu_bits.sh
#
# Needs no network: the demo models come from $SURGERY_CACHE (or are built). Writes its outputs
# under $OUT (default: bench-data/gpu-bits).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-data/gpu-bits}"
mkdir -p "$out"
. benchmarks/gpu_prepare.sh
python -m pytest -q -p no:cacheprovider tests/test_bits.py tests/test_gptq.py tests/test_tie.py tests/test_ensemble.py tests/test_offload.py -k cuda -rs 2>&1 \
    | tee "$out/pytest.txt"
python --version | tee "$out/python.txt"
base="$(python -c 'from surgery.demo_models import demo_model; print(demo_model("base"))')"
for device in cpu cuda; do
    python -m surgery eval "$base" --no-compare --data builtin:mixed-heldout --max-tokens 16384 --device "$device" \
        --dtype float32 --json > "$out/eval-$device.json"
    python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['perplexity'], r['tokens'])" \
        "$out/eval-$device.json" "$device" | tee -a "$out/eval.txt"
done
