#!/usr/bin/env bash
# GPU checks of layer tying: `tie` with --device cuda equals --device cpu (the SVDs run on the
# GPU), and a compact model scores on cuda as on cpu (tests/test_tie.py -k cuda); then the tie
# table on cuda.
#
#   benchmarks/gpu_tie.sh
#
# Needs no network: the demo models come from $SURGERY_CACHE (or are built). Writes its outputs
# under $OUT (default: bench-data/gpu-tie).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-data/gpu-tie}"
mkdir -p "$out"
. benchmarks/gpu_prepare.sh
python -m pytest -q -p no:cacheprovider tests/test_tie.py -k cuda -rs 2>&1 | tee "$out/pytest.txt"
python benchmarks/tie_table.py --device cuda --max-tokens 16384 2>&1 | grep -v "capped" | tee "$out/tie-table-cuda.txt"
