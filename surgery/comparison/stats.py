"""How much a tensor changed: norms, cosine, max difference, computed block by block so memory is
bounded by a block, not by the tensor. Not torch: importing it alone costs several times reading a
1B model from the page cache. A small C kernel (`_measure.c`, built at install where a compiler
is found) takes a part's raw bytes in one pass; numpy, with the same results, is the fallback."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from surgery.checkpoint.blocks import BlockReader, decode
from surgery.checkpoint.reader import DTYPE_SIZES, TensorInfo, numel
from surgery.comparison.workers import Workers

try:
    from surgery.comparison._measure import measure as fused_measure
except ImportError:  # installed without a C compiler
    fused_measure = None

FUSED_DTYPES = {"BF16", "F32"}  # the kernel decodes these itself; others reach it widened to float32
BLOCK_ELEMENTS = 1 << 18  # large enough that threads rarely contend for the GIL, small enough for L2/L3
PART_ELEMENTS = 1 << 22  # one task of the pool


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

    @staticmethod
    def from_sums(diff_sq: float, a_sq: float, dot_ad: float, max_abs: float, within: bool) -> Change:
        """From the sums over D = B - A: ||B||^2 = ||A||^2 + 2<A,D> + ||D||^2, <A,B> = ||A||^2 + <A,D>."""
        return Change(diff_sq, a_sq, a_sq + 2 * dot_ad + diff_sq, a_sq + dot_ad, max_abs, within)

    def __add__(self, other: Change) -> Change:
        return Change(self.diff_sq + other.diff_sq, self.a_sq + other.a_sq, self.b_sq + other.b_sq,
                      self.dot + other.dot, _max_nan(self.max_abs, other.max_abs),
                      self.within_tolerance and other.within_tolerance)


def _max_nan(x: float, y: float) -> float:
    """max that keeps a NaN (a NaN difference is reported, not hidden behind a finite one)."""
    return math.nan if math.isnan(x) or math.isnan(y) else max(x, y)


ZERO = Change(0.0, 0.0, 0.0, 0.0, 0.0, True)


class Sketches:
    """A layer's fingerprint for similarity: the samples of each of its matrices (start, middle and
    end, 2,048 elements each: the bytes that fingerprint it, so nothing more is read), each widened
    and scaled to unit length in float64, concatenated and scaled by 1/sqrt(count), so that one dot
    product of two layers' sketches is the mean cosine over their matrices. Enough to tell which
    layer of A a changed layer of B came from, and cheap: a few small numpy calls per tensor."""

    def __init__(self, samples: Callable[[TensorInfo], bytes]) -> None:
        self.samples = samples
        self._layers: dict[tuple[TensorInfo, ...], np.ndarray] = {}

    def __call__(self, tensors: tuple[TensorInfo, ...]) -> np.ndarray:
        if tensors not in self._layers:
            parts = [self.unit_samples(info) for info in tensors]
            self._layers[tensors] = np.concatenate(parts) / np.sqrt(len(parts))
        return self._layers[tensors]

    def unit_samples(self, info: TensorInfo) -> np.ndarray:
        """The tensor's samples as one unit vector (a zero one has cosine 0 with anything)."""
        raw = self.samples(info)
        values = decode(raw, info.dtype, np.empty(len(raw) // DTYPE_SIZES[info.dtype], dtype=np.float32))
        values = values.astype(np.float64)
        norm = float(np.linalg.norm(values))
        return values / norm if norm else values


def measure(workers: Workers, a: TensorInfo, b: TensorInfo, atol: float, rtol: float) -> list[Future[Change]]:
    """The change from A to B (same shape), queued on the workers in parts; `total` adds them up.
    Each pair is queued without waiting for the last, so all cores stay busy across small and large tensors."""
    measure_range = fused_range if fused_measure is not None else numpy_range
    return workers.ranges(numel(a.shape), PART_ELEMENTS,
                          lambda reader, start, stop: measure_range(reader, a, b, start, stop, atol, rtol))


def total(parts: list[Future[Change]]) -> Change:
    return sum((part.result() for part in parts), ZERO)


def fused_range(
    reader: BlockReader, a: TensorInfo, b: TensorInfo, start: int, stop: int, atol: float, rtol: float
) -> Change:
    """Elements [start, stop) through the C kernel: straight from the mapped files when it decodes
    both dtypes, else block by block, widened to float32 first."""
    if start == stop:
        return ZERO
    if a.dtype in FUSED_DTYPES and b.dtype in FUSED_DTYPES:
        with reader.mapped(a, start, stop) as bytes_a, reader.mapped(b, start, stop) as bytes_b:
            return Change.from_sums(*fused_measure(bytes_a, a.dtype, bytes_b, b.dtype, atol, rtol))
    change = ZERO
    for first in range(start, stop, BLOCK_ELEMENTS):
        last = min(stop, first + BLOCK_ELEMENTS)
        block_a, dtype_a = _fused_input(reader, 0, a, first, last)
        block_b, dtype_b = _fused_input(reader, 1, b, first, last)
        change = change + Change.from_sums(*fused_measure(block_a, dtype_a, block_b, dtype_b, atol, rtol))
    return change


def _fused_input(reader: BlockReader, slot: int, info: TensorInfo, first: int, last: int) -> tuple[memoryview | np.ndarray, str]:
    if info.dtype in FUSED_DTYPES:
        return reader.raw(slot, info, first, last), info.dtype
    return reader.array(slot, info, first, last), "F32"


def numpy_range(
    reader: BlockReader, a: TensorInfo, b: TensorInfo, start: int, stop: int, atol: float, rtol: float
) -> Change:
    """Elements [start, stop) in float32 blocks that stay in cache; sums accumulate in float64 across
    blocks (float32 BLAS dots over one block lose ~1e-7 relative, over a whole tensor ~1e-5)."""
    diff_sq = a_sq = dot_ad = max_abs = 0.0
    within = True
    for first in range(start, stop, BLOCK_ELEMENTS):
        last = min(stop, first + BLOCK_ELEMENTS)
        block_a, block_b = reader.array(0, a, first, last), reader.array(1, b, first, last)
        delta = np.subtract(block_b, block_a, out=reader.array_scratch(2, last - first))
        diff_sq += float(np.dot(delta, delta))
        a_sq += float(np.dot(block_a, block_a))
        dot_ad += float(np.dot(block_a, delta))
        np.abs(delta, out=delta)
        max_abs = _max_nan(max_abs, float(delta.max()))  # numpy's max returns NaN when there is one
        if atol or rtol:
            np.abs(block_a, out=block_a)
            within = within and bool(np.all(delta <= atol + rtol * block_a))
        else:
            within = within and max_abs == 0.0
    return Change.from_sums(diff_sq, a_sq, dot_ad, max_abs, within)
