#!/usr/bin/env bash
# GPU check of healing: the heal table (benchmarks/heal_table.py) with --device cuda, teacher and
# student on the GPU. Its figures should tell the same story as the CPU's in docs/heal.md (GPU
# kernels round differently, so not the same digits).
#
#   benchmarks/gpu_heal.sh [--steps 200]
#
# Needs no network: the demo models come from $SURGERY_CACHE (or are built). Writes its output under
# $OUT (default: bench-data/gpu-heal).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-data/gpu-heal}"
mkdir -p "$out"
. benchmarks/gpu_prepare.sh
python benchmarks/heal_table.py --device cuda "$@" 2>&1 | grep -v "^heal: \|capped" | tee "$out/heal-table-cuda.txt"
