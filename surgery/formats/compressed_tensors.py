"""compressed-tensors' `pack-quantized` format: signed b-bit integers offset to unsigned and packed
little-end first into int32 words (32 / b per word) along the input dimension (`compute.quantize.pack`);
a `quantization_config` names the modules of each bit width.

Widths 2, 4 and 8 divide a word, so every version of the format reads them alike.
"""

from __future__ import annotations

from typing import Any

PACKED_BITS = (2, 4, 8)


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
