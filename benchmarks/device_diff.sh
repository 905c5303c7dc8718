#!/usr/bin/env bash
# `surgery diff` against `cat` on a many-core machine (the diff splits every tensor's bytes and
# arithmetic across the cores; the development machine has 2). Same script as the 2-core figures:
# bench_diff.py generates the ~1.1B checkpoint, its fine-tune and its drop-layers chain output,
# then times each command 5 times with the page cache warm; diff_timeline.py says where one run's
# time goes. typer's version is recorded: 0.29 and later add ~0.25 s to the start (docs/benchmarks.md).
#
#   benchmarks/device_diff.sh
#
# Needs no network. Writes its outputs under $OUT (default: bench-data/device-diff).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-data/device-diff}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the working tree is not installed there: build diff's C kernel in place (numpy fallback if no compiler)
python setup.py -q build_ext --inplace 2>&1 | tail -3 || true
python -c "import surgery.comparison._measure" && echo "kernel: built" || echo "kernel: numpy fallback"
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)"; python -c "import typer; print('typer', typer.__version__)"; } | tee "$out/machine.txt"
time python benchmarks/bench_diff.py --runs 5 | tee "$out/bench.txt"
python benchmarks/diff_timeline.py | tee "$out/timeline.txt"
