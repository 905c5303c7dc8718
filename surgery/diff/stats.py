"""How much a tensor changed: norms, cosine, max difference, computed in float32 block by block so
memory is bounded by a block, not by the tensor. numpy, not torch: importing torch alone costs
several times reading a 1B model from the page cache."""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from surgery.checkpoint.blocks import BlockReader
from surgery.checkpoint.reader import TensorInfo, numel
from surgery.diff.workers import Workers

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

    def __add__(self, other: Change) -> Change:
        return Change(self.diff_sq + other.diff_sq, self.a_sq + other.a_sq, self.b_sq + other.b_sq,
                      self.dot + other.dot, max(self.max_abs, other.max_abs),
                      self.within_tolerance and other.within_tolerance)


ZERO = Change(0.0, 0.0, 0.0, 0.0, 0.0, True)


class Sketches:
    """A layer's fingerprint for similarity: a few evenly spaced rows of each of its matrices (the
    whole tensor when small), thinned to at most `elements` values, each scaled to unit length in float64, concatenated and scaled by
    1/sqrt(count), so that one dot product of two layers' sketches is the mean cosine over their
    matrices. Enough to tell which layer of A a changed layer of B came from. Rows are read on the
    workers, ahead of need when `prefetch` names them."""

    def __init__(self, workers: Workers, rows: int = 8, elements: int = 8192) -> None:
        self.workers = workers
        self.rows = rows
        self.elements = elements  # bounds the cache: a 70B model's 80 layers x 2 stay under 100 MiB
        self._rows: dict[TensorInfo, Future[np.ndarray]] = {}
        self._layers: dict[tuple[TensorInfo, ...], np.ndarray] = {}

    def prefetch(self, tensors: Iterable[TensorInfo]) -> None:
        for info in tensors:
            if info not in self._rows:
                self._rows[info] = self.workers.submit(lambda reader, info=info: self._unit_rows(reader, info))

    def __call__(self, tensors: tuple[TensorInfo, ...]) -> np.ndarray:
        if tensors not in self._layers:
            self.prefetch(tensors)
            parts = [self._rows[info].result() for info in tensors]
            self._layers[tensors] = np.concatenate(parts) / np.sqrt(len(parts))
        return self._layers[tensors]

    def _unit_rows(self, reader: BlockReader, info: TensorInfo) -> np.ndarray:
        count = info.shape[0] if info.shape else 1
        per_row = numel(info.shape) // count if count else 0
        picks = range(count) if len(info.shape) < 2 or count <= self.rows else \
            np.linspace(0, count - 1, self.rows).round().astype(int).tolist()
        rows = np.concatenate([reader.array(0, info, i * per_row, (i + 1) * per_row) for i in picks])
        rows = rows[:: max(1, -(-rows.size // self.elements))].astype(np.float64)
        norm = float(np.linalg.norm(rows))
        return rows / norm if norm else rows  # a zero sketch has cosine 0 with anything


def measure_all(workers: Workers, pairs: list[tuple[TensorInfo, TensorInfo]], atol: float, rtol: float) -> list[Change]:
    """Change from A to B for each (A, B) pair of same-shape tensors: every pair's parts are queued
    at once, so all cores stay busy across small and large tensors alike."""
    queued = [workers.ranges(numel(a.shape), PART_ELEMENTS,
                             lambda reader, start, stop, a=a, b=b: _measure_range(reader, a, b, start, stop, atol, rtol))
              for a, b in pairs]
    return [sum((part.result() for part in parts), ZERO) for parts in queued]


def _measure_range(
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
        # with B = A + D: ||B||^2 = ||A||^2 + 2<A,D> + ||D||^2 and <A,B> = ||A||^2 + <A,D>
        diff_sq += float(np.dot(delta, delta))
        a_sq += float(np.dot(block_a, block_a))
        dot_ad += float(np.dot(block_a, delta))
        max_abs = max(max_abs, float(delta.max()), -float(delta.min()))
        if atol or rtol:
            np.abs(block_a, out=block_a)
            within = within and bool(np.all(np.abs(delta, out=delta) <= atol + rtol * block_a))
        else:
            within = within and max_abs == 0.0
    return Change(diff_sq, a_sq, a_sq + 2 * dot_ad + diff_sq, a_sq + dot_ad, max_abs, within)
