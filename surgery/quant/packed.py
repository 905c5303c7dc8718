"""compressed-tensors' `pack-quantized` format: signed b-bit integers offset to unsigned and packed
little-end first into int32 words (32 / b per word) along the input dimension; a
`quantization_config` names the modules of each bit width.

Widths 2, 4 and 8 divide a word, so every version of the format reads them alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PACKED_BITS = (2, 4, 8)


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values of `bits` bits packed into int32 along the rows (their length a multiple of 32 / bits)."""
    import torch

    per_word = 32 // bits
    unsigned = (values.to(torch.int64) + (1 << (bits - 1))).reshape(values.shape[0], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    words = (unsigned << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # the same 32 bits, signed


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
