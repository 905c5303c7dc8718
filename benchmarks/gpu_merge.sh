#!/usr/bin/env bash
# GPU checks of the merges: the CUDA tests (a merge, and one with rows aligned by token, on cuda equal
# the cpu ones), then five merge methods of the ~1.1B checkpoint + 2 noisy variants with --device cuda
# beside --device cpu on the same machine (bench_merge.py, one run each: the device time is 15 minutes).
#
#   benchmarks/gpu_merge.sh
#
# Needs no network: the demo models come from $SURGERY_CACHE (or are built), the checkpoints are
# generated locally. Writes its outputs under $OUT (default: bench-data/gpu-merge).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-data/gpu-merge}"
mkdir -p "$out"
. benchmarks/gpu_prepare.sh
python -m pytest -q -p no:cacheprovider tests/test_task_vectors.py tests/test_vocabularies.py -k cuda -rs 2>&1 | tee "$out/pytest.txt"
for device in cuda cpu; do
    python benchmarks/bench_merge.py --runs 1 --device "$device" --mergekit "" \
        --methods task_arithmetic,ties,dare_ties,slerp,model_stock | tee "$out/bench-$device.txt"
done
