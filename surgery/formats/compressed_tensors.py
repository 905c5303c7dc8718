"""compressed-tensors' `pack-quantized` format: signed b-bit integers offset to unsigned and packed
little-end first into int32 words (32 / b per word) along the input dimension (`compute.quantize.pack`);
a `quantization_config` names the modules of each bit width.

Widths 2, 4 and 8 divide a word, so every version of the format reads them alike.
"""

from __future__ import annotations

from typing import Any

PACKED_BITS = (2, 4, 8)

# Which packed widths each runtime loads, and where that is known from: a width not listed for a
# runtime does not load there. Kept beside docs/quantization.md's support table.
RUNTIME_SUPPORT: dict[str, tuple[tuple[int, ...], str]] = {
    "transformers with compressed-tensors": ((2, 4, 8), "tested here: tests/test_bits.py, tests/test_gptq.py"),
    "vLLM (GPU)": ((4, 8), "its compressed-tensors reader takes 4 and 8 bits (WNA16: uint4b8, uint8b128)"),
    "vLLM (CPU build)": ((4,), "measured with vLLM 0.32: no CPU kernel for 8-bit groups (uint8b128)"),
}


def runtime_warnings(widths: set[int]) -> list[str]:
    """One line per runtime that cannot load some of the packed widths, naming them and why."""
    lines = []
    for runtime, (loads, source) in RUNTIME_SUPPORT.items():
        missing = sorted(widths - set(loads))
        if missing:
            lines.append(f"layers of {' and '.join(map(str, missing))} bits do not load in {runtime} ({source}); "
                         f"it loads {' and '.join(map(str, loads))} bits")
    return lines


def quantization_config(groups: dict[int, list[str]], group_size: int, symmetric: bool, ignore: list[str]) -> dict[str, Any]:
    """One config group per bit width, targeting modules by exact name."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {
                "targets": sorted(modules),
                "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
                            "group_size": group_size, "dynamic": False, "observer": "minmax"},
                "input_activations": None,
                "output_activations": None,
            }
            for i, (bits, modules) in enumerate(sorted(groups.items()))
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }
