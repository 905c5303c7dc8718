#!/usr/bin/env bash
# GPU checks of the task-vector merges: the CUDA test (a merge on cuda equals the cpu one), then
# every merge method of the ~1.1B checkpoint + 2 noisy variants with --device cuda beside
# --device cpu on the same machine (bench_merge.py, medians of 3).
#
#   benchmarks/gpu_merge.sh
#
# Needs no network: the demo models come from $SURGERY_CACHE (or are built), the checkpoints are
# generated locally. Writes its outputs under $OUT (default: bench-data/gpu-merge).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-data/gpu-merge}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q -p no:cacheprovider tests/test_task_vectors.py -k cuda -rs 2>&1 | tee "$out/pytest.txt"
for device in cuda cpu; do
    python benchmarks/bench_merge.py --runs 3 --device "$device" --mergekit "" | tee "$out/bench-$device.txt"
done
