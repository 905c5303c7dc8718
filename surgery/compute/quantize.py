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

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from surgery.checkpoint.blocks import torch_dtype
from surgery.errors import SurgeryError
from surgery.recipe.tensor import Unprepared

if TYPE_CHECKING:
    import torch

Part = Literal["dense", "packed", "scale"]


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

    def part(self, part: Part, bits: int) -> torch.Tensor:
        """What one stored tensor holds: the dense weight, the packed words or the scales."""
        if part == "dense":
            return self.dequantized()
        return pack(self.values, bits) if part == "packed" else self.scale


def require_finite(weight: torch.Tensor, quantizer: str, op: str) -> None:
    """Refuse a weight with inf or NaN: its group's scale would be inf, and every weight of the group NaN."""
    import torch

    finite = torch.isfinite(weight)
    if not finite.all():
        raise SurgeryError(f"holds {int((~finite).sum())} non-finite value(s) (inf or NaN), which {quantizer} cannot "
                           f"scale: fix the input, or leave the tensor unquantized with {op}.keep")


def integer_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def grid(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN's scale (in `dtype`) and zero point (float, integral) of each group of a 2-D weight: the grid
    every quantizer here rounds to, so that all of them pack alike."""
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
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=scale.device), scale)
    zero = torch.zeros_like(scale, dtype=weight.dtype) if symmetric else \
        (q_min - low / scale.to(weight.dtype)).clamp(q_min, q_max).round()
    return scale, zero


def rounded(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers nearest to weight / scale + zero within the width's range (arguments broadcast)."""
    q_min, q_max = integer_range(bits)
    return (weight / scale.to(weight.dtype) + zero).round().clamp(q_min, q_max)


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype) -> Quantized:
    """RTN of a 2-D weight (float32 in), scales stored in `dtype`."""
    import torch

    out, columns = weight.shape
    scale, zero = grid(weight, bits, group_size, symmetric, dtype)
    values = rounded(weight.reshape(out, columns // group_size, group_size), scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return Quantized(values.reshape(out, columns).to(torch.int8), scale, zero.to(torch.int8))


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values of `bits` bits packed into int32 along the rows (their length a multiple of 32 / bits):
    compressed-tensors' `pack-quantized` layout, offset to unsigned, little end first."""
    import torch

    per_word = 32 // bits
    unsigned = (values.to(torch.int64) + (1 << (bits - 1))).reshape(values.shape[0], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    words = (unsigned << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # the same 32 bits, signed


@dataclass(frozen=True)
class Rtn(Unprepared):
    """RTN of a whole matrix; outputs the dequantized weight or one part of the packed format. A 3-D
    tensor of fused experts is quantized expert by expert along each expert's input dimension (the
    middle one where `transposed`: stored (input, output), as gpt-oss does); only `dense` for those."""

    bits: int
    group_size: int
    symmetric: bool
    dtype: str
    part: Part = "dense"
    transposed: bool = False
    elementwise = False


    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:

        require_finite(inputs[0], "RTN", "bits")
        weight = inputs[0].transpose(-1, -2) if self.transposed else inputs[0]
        shape = weight.shape  # groups run along the last axis; each row of each expert is a row
        quantized = quantize(weight.reshape(-1, shape[-1]), self.bits, self.group_size, self.symmetric,
                             torch_dtype(self.dtype))
        if self.part != "dense":
            return quantized.part(self.part, self.bits)
        dense = quantized.dequantized().reshape(shape)
        return dense.transpose(-1, -2) if self.transposed else dense

    def of_part(self, part: Part) -> Rtn:
        return replace(self, part=part)

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        layout = ", stored (input, output)" if self.transposed else ""
        return f"RTN {self.bits}-bit {kind}, groups of {self.group_size}{layout}, {self.part}"


@dataclass(frozen=True)
class FromIntegers(Unprepared):
    """A weight a calibrated quantizer (GPTQ) rounded, from the integers, scales and zero points it stored
    (the inputs, in that order): the dense weight or the packed words, as RTN's would be."""

    method: str
    bits: int
    dtype: str
    part: Literal["dense", "packed"] = "dense"
    elementwise = False

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        values, scale, zero = inputs
        return Quantized(values.to(torch.int8), scale.to(torch_dtype(self.dtype)), zero.to(torch.int8)).part(
            self.part, self.bits)

    def describe(self) -> str:
        return f"{self.method} {self.bits}-bit, {self.part}"


@dataclass(frozen=True)
class Constant(Unprepared):
    """A tensor computed from no data (the `weight_shape` the packed format stores)."""

    values: tuple[int, ...]
    elementwise = False


    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.tensor(self.values, dtype=torch.int64)

    def describe(self) -> str:
        return f"constant {list(self.values)}"
