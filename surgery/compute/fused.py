"""The merges' fused passes (_combine.c), where they are built: the stored bytes in, the output dtype's
bytes out, with the torch path's arithmetic in the same order, so both give the same bits.

- A weighted sum of the inputs: task arithmetic, linear, and slerp, multislerp, karcher, model_stock
  once their per-tensor coefficients are solved.
- TIES and the task-arithmetic family with magnitude trims: the exact top-k cut of each task vector by a
  radix select on the magnitudes' bits (select.py's algorithm, with its histograms made in C), then
  trim, sign election and the disjoint mean in one pass.

A compute offers a pass through `fused_pass()` (None where the kernels are not built); its `prepare` is
handed blocks that also read raw (recipe/raw.py), which the magnitude cuts use."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np

from surgery.checkpoint.reader import DTYPE_SIZES
from surgery.recipe.raw import RawBlock, RawBlocks

try:
    from surgery.compute._combine import combine, magnitude_counts, nth_equal, ties
except ImportError:  # built without a C compiler: the torch path computes the same bits
    combine = magnitude_counts = nth_equal = ties = None

_BINS = 1 << 16
_HELPERS = min(1, (os.cpu_count() or 1) - 1)  # a second core counts half of each block's magnitudes


def raw_blocks(blocks: object) -> RawBlocks | None:
    """The raw reading the streamer attached to a compute's blocks, when the kernels are built to use it."""
    return getattr(blocks, "raw", None) if magnitude_counts is not None else None


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

    def into(self, out: memoryview, out_dtype: str, block: RawBlock) -> None:
        """Write the sum of the block's inputs (the base first when there is one) into `out`."""
        assert combine is not None
        combine(out, out_dtype, block.inputs, block.dtype, self.coefficients, self.has_base, self.centered,
                self.zero_start, self.divisor, self.factor)


KEEP_KINDS = {"all": 0, "none": 1, "top": 2}


@dataclass(frozen=True)
class TrimmedSum:
    """SparseMerge with trims that keep all, none or the top of each task vector (sparse.py's __call__):
    per model its keep kind, the cut's value and position (top), weight and L1 rescale; consensus and
    normalize as there, `divisor` the summed weights used without consensus, `lam` the final scale."""

    kinds: tuple[int, ...]
    values: tuple[float, ...]
    positions: tuple[int, ...]
    weights: tuple[float, ...]
    scales: tuple[float, ...]
    consensus: bool
    normalize: bool
    divisor: float
    lam: float

    def into(self, out: memoryview, out_dtype: str, block: RawBlock) -> None:
        assert ties is not None
        limits = tuple(p - block.start for p in self.positions)  # equal entries are kept below the cut's position
        ties(out, out_dtype, block.inputs, block.dtype, self.kinds, self.values, limits, self.weights, self.scales,
             self.consensus, self.normalize, self.divisor, self.lam)


def top_magnitude_cuts(raw: RawBlocks, counts: list[int | None], n: int) -> list[tuple[float, int] | None]:
    """Per model, the (value, position) cut that keeps exactly counts[model] of the largest |model - base|,
    ties at the last one kept by lowest position (select.top_cuts' cut, found in C); None where counts is."""
    assert magnitude_counts is not None and nth_equal is not None
    high = _counted(raw, tuple(-2 if k is None else -1 for k in counts))
    placed = [None if k is None else _bin_of(high[t * _BINS:(t + 1) * _BINS], n - k) for t, k in enumerate(counts)]
    low = _counted(raw, tuple(-2 if p is None else p[0] for p in placed))
    cuts: list[tuple[float, int] | None] = []
    for t, (k, at) in enumerate(zip(counts, placed, strict=True)):
        if k is None or at is None:
            cuts.append(None)
            continue
        high_bin, below_high = at
        in_bin = low[t * _BINS:(t + 1) * _BINS]
        low_bin, below_low = _bin_of(in_bin, n - k - below_high)
        bits = (high_bin << 16) | low_bin
        lower, equal = below_high + below_low, int(in_bin[low_bin])
        nth = k - (n - lower - equal)  # how many of the entries equal to the cut are kept
        position = n if nth >= equal else 0 if nth == 0 else _nth_position(raw, t, bits, nth)
        cuts.append((float(np.array([bits], dtype=np.uint32).view(np.float32)[0]), position))
    return cuts


def _counted(raw: RawBlocks, wanted: tuple[int, ...]) -> np.ndarray:
    """magnitude_counts over every block, each block's halves counted on two threads (the GIL is released)."""
    assert magnitude_counts is not None
    halves = [np.zeros(len(wanted) * _BINS, dtype=np.int64) for _ in range(_HELPERS + 1)]
    for block in raw():
        n = len(block.inputs[0]) // DTYPE_SIZES[block.dtype]
        cut = n // 2 * DTYPE_SIZES[block.dtype]
        if n < 1 << 16 or not _HELPERS:
            magnitude_counts(memoryview(halves[0]), block.inputs, block.dtype, wanted)
            continue
        later = _pool().submit(magnitude_counts, memoryview(halves[1]), tuple(v[cut:] for v in block.inputs),
                               block.dtype, wanted)
        magnitude_counts(memoryview(halves[0]), tuple(v[:cut] for v in block.inputs), block.dtype, wanted)
        later.result()
    return sum(halves[1:], halves[0])


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_HELPERS, thread_name_prefix="surgery-fused")


def _nth_position(raw: RawBlocks, model: int, bits: int, nth: int) -> int:
    """Where the nth (0-based) entry of |model - base| with these bits sits."""
    assert nth_equal is not None
    for block in raw():
        count, at = nth_equal(block.inputs, block.dtype, model, bits, nth)
        if at >= 0:
            return block.start + at
        nth -= count
    raise AssertionError("fewer equal entries than counted")


def _bin_of(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the entry of 0-based ascending `rank`, and how many entries lie in bins below it."""
    upto = np.cumsum(counts)
    index = int(np.searchsorted(upto, rank, side="right"))
    return index, int(upto[index] - counts[index])
