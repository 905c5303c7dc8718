"""How much a tensor changed: norms, cosine, max difference, computed in float32 block by block so
memory is bounded by a block, not by the tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from surgery.checkpoint.blocks import BLOCK_ELEMENTS, BlockReader
from surgery.checkpoint.reader import TensorInfo, numel


@dataclass(frozen=True)
class Change:
    """Sums that aggregate across tensors (per layer, per module kind) by adding them."""

    diff_sq: float  # ||B - A||^2
    a_sq: float  # ||A||^2
    b_sq: float  # ||B||^2
    dot: float  # <A, B>
    max_abs: float
    within_tolerance: bool

    @property
    def relative(self) -> float:
        """||B - A|| / ||A|| (inf when A is zero and B is not)."""
        if self.a_sq == 0:
            return 0.0 if self.diff_sq == 0 else math.inf
        return math.sqrt(self.diff_sq / self.a_sq)

    @property
    def cosine(self) -> float:
        denominator = math.sqrt(self.a_sq * self.b_sq)
        return self.dot / denominator if denominator else (1.0 if self.diff_sq == 0 else 0.0)

    @property
    def update_norm(self) -> float:
        return math.sqrt(self.diff_sq)

    def __add__(self, other: Change) -> Change:
        return Change(self.diff_sq + other.diff_sq, self.a_sq + other.a_sq, self.b_sq + other.b_sq,
                      self.dot + other.dot, max(self.max_abs, other.max_abs),
                      self.within_tolerance and other.within_tolerance)


ZERO = Change(0.0, 0.0, 0.0, 0.0, 0.0, True)


class Sketches:
    """A few evenly spaced rows of a tensor (the whole tensor when small), flattened to float32 and
    cached: enough to tell which layer of A a changed layer of B came from."""

    def __init__(self, reader: BlockReader, rows: int = 8) -> None:
        self.reader = reader
        self.rows = rows
        self._cache: dict[TensorInfo, Any] = {}

    def __call__(self, info: TensorInfo) -> Any:
        import torch

        if info not in self._cache:
            count = info.shape[0] if info.shape else 1
            per_row = numel(info.shape) // count if count else 0
            picks = range(count) if len(info.shape) < 2 or count <= self.rows else \
                torch.linspace(0, count - 1, self.rows).round().long().tolist()
            self._cache[info] = torch.cat(
                [self.reader.floats(0, info, i * per_row, (i + 1) * per_row).clone() for i in picks]
            )
        return self._cache[info]


def measure(reader: BlockReader, a: TensorInfo, b: TensorInfo, atol: float, rtol: float) -> Change:
    """Change from A to B (same shape), in float32, block by block."""
    import torch

    total = numel(a.shape)
    diff_sq = a_sq = b_sq = dot = max_abs = 0.0
    within = True
    for start in range(0, total, BLOCK_ELEMENTS):
        stop = min(total, start + BLOCK_ELEMENTS)
        block_a = reader.floats(0, a, start, stop)
        block_b = reader.floats(1, b, start, stop)
        delta = torch.sub(block_b, block_a, out=reader.scratch(2, block_a.numel()))
        product = reader.scratch(3, block_a.numel())
        # multiply into a buffer, then torch's cascade sum (BLAS dot loses ~1e-5 relative at this size);
        # with B = A + D: ||B||^2 = ||A||^2 + 2<A,D> + ||D||^2 and <A,B> = ||A||^2 + <A,D>
        block_d_sq = float(torch.mul(delta, delta, out=product).sum())
        block_a_sq = float(torch.mul(block_a, block_a, out=product).sum())
        block_ad = float(torch.mul(block_a, delta, out=product).sum())
        diff_sq += block_d_sq
        a_sq += block_a_sq
        b_sq += block_a_sq + 2 * block_ad + block_d_sq
        dot += block_a_sq + block_ad
        if delta.numel():
            low, high = torch.aminmax(delta)
            max_abs = max(max_abs, -float(low), float(high))
        if atol or rtol:
            within = within and bool(torch.all(delta.abs_() <= atol + rtol * block_a.abs()))
        else:
            within = within and max_abs == 0.0
    return Change(diff_sq, a_sq, b_sq, dot, max_abs, within)
