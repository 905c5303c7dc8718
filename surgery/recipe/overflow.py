"""float16 outputs that overflowed, refused: float16 holds at most 65504, and a value computed beyond it (from
65520 on, float32 rounds to inf) would be written as inf, a broken weight with nothing said. An inf the inputs
held already is written as it is (the plan computes it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from surgery.errors import SurgeryError
from surgery.recipe.raw import RawBlock

if TYPE_CHECKING:
    import torch

# Where each stored dtype keeps its exponent: all ones is inf or NaN.
_EXPONENTS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000)}


def refuse_torch_overflow(value: torch.Tensor, written: torch.Tensor) -> None:
    """`written` is the float16 copy of the float32 block `value`: refused where a finite value became inf."""
    if not bool(written.isinf().any()):
        return
    overflowed = written.isinf() & value.to(written.device).isfinite()
    if bool(overflowed.any()):
        raise SurgeryError(_message(int(overflowed.sum())))


def refuse_raw_overflow(out: memoryview, block: RawBlock) -> None:
    """`out` is a fused pass's float16 output of `block`, holding an inf (the pass counted them in C): refused
    where it is inf and every input is finite."""
    written = np.frombuffer(out, np.uint16)
    at = np.flatnonzero((written & 0x7FFF) == 0x7C00)
    unsigned, exponent = _EXPONENTS[block.dtype]
    finite = np.ones(len(at), dtype=bool)
    for view in block.inputs:
        finite &= (np.frombuffer(view, unsigned)[at] & exponent) != exponent
    if finite.any():
        raise SurgeryError(_message(int(finite.sum())))


def _message(count: int) -> str:
    return (f"{count} entries overflow float16 (beyond +-65504 they would be written as inf); write the output in "
            "bfloat16 or float32 (a merge step's `dtype: bfloat16`)")
