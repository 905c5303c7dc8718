# Sourced by every benchmarks/gpu_*.sh: the device machine has torch, transformers, safetensors, typer, rich,
# pyyaml and pytest but no network, so what else surgery needs comes in gpu-carry/ (carried with the run):
#   pip download blake3 accelerate psutil -d gpu-carry --no-deps  # here, before the run: digests, memory caps
# and the compiled kernels (the fused merges, diff's) are built in place, as an install would build them.
if ! python -c "import blake3" 2>/dev/null; then
    pip install -q --no-index --find-links gpu-carry blake3 || { echo "blake3 is missing: pip download blake3 -d gpu-carry, and carry gpu-carry" >&2; exit 2; }
fi
if ! python -c "import accelerate" 2>/dev/null; then  # the memory-cap tests skip without it
    pip install -q --no-index --no-deps --find-links gpu-carry accelerate psutil || echo "note: no accelerate in gpu-carry; the memory-cap tests skip" >&2
fi
python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "note: the C kernels did not build; the torch paths run" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
