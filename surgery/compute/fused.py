"""Merges whose every output element is a weighted sum of its inputs' elements (task arithmetic,
linear, and slerp, multislerp, karcher, model_stock once their per-tensor coefficients are solved)
run through one fused pass (_combine.c) where it is built: the stored bytes in, the output dtype's
bytes out, with the torch path's arithmetic in the same order, so both give the same bits."""

from __future__ import annotations

from dataclasses import dataclass

try:
    from surgery.compute._combine import combine
except ImportError:  # built without a C compiler: the torch path computes the same bits
    combine = None

FUSED_DTYPES = frozenset({"BF16", "F16", "F32"})


@dataclass(frozen=True)
class WeightedSum:
    """[base +] sum_k c_k v_k with v_k = model_k [- base], divided by `divisor` (0: not divided), then
    `factor` times its distance from the base (LiNeS). `zero_start`: the sum starts from 0.0 (0 + v_0 c_0)
    rather than from the first term, as the torch path it stands for does (the two differ for -0.0)."""

    coefficients: tuple[float, ...]
    has_base: bool
    centered: bool
    zero_start: bool
    divisor: float = 0.0
    factor: float = 1.0

    def into(self, out: memoryview, out_dtype: str, inputs: tuple[memoryview, ...], dtype: str) -> None:
        """Write the sum of `inputs` (all of `dtype`, the base first when there is one) into `out`."""
        assert combine is not None
        combine(out, out_dtype, inputs, dtype, self.coefficients, self.has_base, self.centered, self.zero_start,
                self.divisor, self.factor)
