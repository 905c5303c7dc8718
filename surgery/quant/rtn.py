"""Round-to-nearest quantization with per-group scales, with the integer conventions of the
compressed-tensors format, so that the dense simulation and the packed weights dequantize alike.

For b bits the integers are signed, q in [-2^(b-1), 2^(b-1) - 1]. Groups run along the input
dimension (the last one). Ranges always include 0:
- symmetric: scale = max|w| / ((2^b - 1) / 2), zero point 0;
- asymmetric: scale = (max - min) / (2^b - 1), zero point = round(q_min - min / scale), clamped.
The scale is rounded to the stored dtype first; then q = clamp(round(w / scale + zero), q_min,
q_max), and w ~ (q - zero) * scale, computed in the stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Quantized:
    values: torch.Tensor  # int8, the weight's shape
    scale: torch.Tensor  # stored dtype, (out, in / group)
    zero: torch.Tensor  # int8, (out, in / group); zeros when symmetric

    def dequantized(self) -> torch.Tensor:
        """(q - zero) * scale in the scale's dtype, group by group, in the weight's shape."""
        out, columns = self.values.shape
        groups = self.scale.shape[1]
        q = self.values.reshape(out, groups, columns // groups).to(self.scale.dtype)
        z = self.zero.to(self.scale.dtype).unsqueeze(-1)
        return ((q - z) * self.scale.unsqueeze(-1)).reshape(out, columns)


def integer_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype) -> Quantized:
    """RTN of a 2-D weight (float32 in), scales stored in `dtype`."""
    import torch

    out, columns = weight.shape
    groups = weight.reshape(out, columns // group_size, group_size)
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    q_min, q_max = integer_range(bits)
    if symmetric:
        scale = torch.maximum(low.abs(), high) / ((q_max - q_min) / 2)
    else:
        scale = (high - low) / (q_max - q_min)
    scale = scale.to(dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scale)
    wide = scale.float()
    zero = torch.zeros_like(wide) if symmetric else (q_min - low / wide).clamp(q_min, q_max).round()
    values = (groups / wide.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(q_min, q_max)
    return Quantized(values.reshape(out, columns).to(torch.int8), scale, zero.to(torch.int8))
