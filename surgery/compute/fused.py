"""The merges' fused passes (_combine.c), where they are built: the stored bytes in, the output dtype's
bytes out, with the torch path's arithmetic in the same order, so both give the same bits.

- A weighted sum of the inputs: task arithmetic, linear, and slerp, multislerp, karcher, model_stock
  once their per-tensor coefficients are solved.
- The task-arithmetic family (TIES, DARE, breadcrumbs, with or without sign election and the L1 rescale):
  each task vector's trim (its top-k, a band of ranks, or the seeded random mask of noise.py), then sign
  election and the (disjoint) mean in one pass. della's keep probabilities rank each row (a radix sort in
  C); with its L1 rescale, the L1 pass keeps the masks as bits for the merge pass.
- SCE: the top of the variance over the task vectors, each model's energy, the merge.

The exact cuts (a top-k, a band's edges, SCE's variance) come from a sample (one chunk in SAMPLE_EVERY)
that brackets each; one pass counts the scores above the bracket and collects those inside it, and the
cut is chosen among those. Where a bracket missed, a radix select on the scores' bits (select.py's
algorithm; for the magnitudes' top-k its histograms made in C) finds it. Either way the same cut. The L1
norms and SCE's energies are float64 sums, added in another order than torch adds them: the two paths'
rescales and weights can differ in their last bits, so a merge's output can too, rarely and by one
rounding.

A compute offers a pass through `fused_pass()` (None where the kernels are not built); its `prepare` is
handed blocks that also read raw (recipe/raw.py), which the cuts and sums use."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from surgery.checkpoint.reader import DTYPE_SIZES
from surgery.recipe.overflow import refuse_raw_overflow
from surgery.recipe.raw import RawBlock, RawBlocks

try:
    from surgery.compute._combine import (
        combine,
        f16_infinities,
        l1_norms,
        magnitude_counts,
        magnitude_window,
        nth_equal,
        sce,
        sce_energy,
        ties,
        variance_window,
    )
except ImportError:  # built without a C compiler: the torch path computes the same bits
    combine = l1_norms = magnitude_counts = magnitude_window = nth_equal = sce = sce_energy = ties = None
    variance_window = f16_infinities = None

_BINS = 1 << 16
_CHUNK = 512  # the kernels' chunk: the sample reads whole ones
SAMPLE_EVERY = 128  # the sample reads one chunk in this many (all of a tensor too small for a sample to pay)
_WHOLE_SAMPLE = 1 << 16  # entries below which the sample is the tensor itself
_MARGIN = 8.0  # standard deviations of the sample's rank either side of the cut's estimate
_ALL_BITS = 0xFFFFFFFF
_MAX_INPUTS = 64  # the kernels' MAX_INPUTS
_PACKED_LIMIT = 256 << 20  # bytes of della's masks kept between its passes, at most
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
        _refuse_overflow(out, out_dtype, block)


KEEP_KINDS = {"all": 0, "none": 1, "top": 2, "band": 3, "random": 4, "della": 5}


@dataclass(frozen=True)
class KernelTrim:
    """One model's trim as the kernels take it: its KEEP_KINDS kind; top: keep magnitudes above `value`, and
    those equal to it at positions below `position`; band: keep those at or above (value, position) and not
    at or above (high, high_position) in the ascending order (ties by position); random: keep where the
    stream `key`'s noise (noise.py) is below threshold / 2^24; della: keep where that noise is below
    offset + spread * rank / (row - 1), rank the magnitude's in its row of `row` entries."""

    kind: int
    value: float = 0.0
    position: int = 0
    high: float = 0.0
    high_position: int = 0
    key: int = 0
    threshold: int = 0
    row: int = 1
    spread: float = 0.0
    offset: float = 0.0

    def fields(self) -> tuple[int, float, int, float, int, int, int, int, float, float]:
        return (self.kind, self.value, self.position, self.high, self.high_position, self.key, self.threshold,
                self.row, self.spread, self.offset)


@dataclass(frozen=True)
class TrimmedSum:
    """SparseMerge with trims the kernels make (sparse.py's __call__): per model its trim, weight and L1
    rescale; consensus and normalize as there, `divisor` the summed weights used without consensus, `lam`
    the final scale."""

    trims: tuple[KernelTrim, ...]
    weights: tuple[float, ...]
    scales: tuple[float, ...]
    consensus: bool
    normalize: bool
    divisor: float
    lam: float
    packed: bytearray | None = field(default=None, compare=False, repr=False)  # della's masks, from kept_masks

    def into(self, out: memoryview, out_dtype: str, block: RawBlock) -> None:
        if any(t.kind in (KEEP_KINDS["random"], KEEP_KINDS["della"]) for t in self.trims):  # bound by their noise
            _in_halves(self._part, out, out_dtype, block, _unit(self.trims))
        else:  # bound by memory: a second thread only competes with the writer
            self._part(out, out_dtype, block)
        _refuse_overflow(out, out_dtype, block)

    def _part(self, out: memoryview, out_dtype: str, block: RawBlock) -> None:
        assert ties is not None
        ties(out, out_dtype, block.inputs, block.dtype, tuple(t.fields() for t in self.trims), self.weights,
             self.scales, self.consensus, self.normalize, self.divisor, self.lam, block.start, self.packed)


def kept_masks(trims: tuple[KernelTrim, ...], n: int) -> bytearray | None:
    """Room for della's masks of a tensor of n entries as bits, one stride per model, which the L1 pass fills
    and the merge pass reads instead of ranking every row again; None for other trims, or above
    _PACKED_LIMIT bytes (the merge then ranks them again)."""
    size = len(trims) * -(-n // 8)
    if all(t.kind != KEEP_KINDS["della"] for t in trims) or size > _PACKED_LIMIT:
        return None
    return bytearray(size)


def _unit(trims: tuple[KernelTrim, ...]) -> int:
    """Where a block's halves may split: between della's rows, and between bytes of its packed masks."""
    return math.lcm(max(t.row for t in trims), 8)


def l1_norms_of(raw: RawBlocks, trims: tuple[KernelTrim, ...], packed: bytearray | None = None
                ) -> list[tuple[float, float]]:
    """Per model, the L1 norms of |model - base| before and after its trim; della's masks kept in `packed`."""
    assert l1_norms is not None
    fields = tuple(t.fields() for t in trims)
    totals = [[0.0, 0.0] for _ in trims]
    for part in _halves(raw, lambda inputs, dtype, start: l1_norms(inputs, dtype, fields, start, packed),
                        _unit(trims)):
        for total, (before, after) in zip(totals, part, strict=True):
            total[0] += before
            total[1] += after
    return [(before, after) for before, after in totals]


@dataclass(frozen=True)
class SceSum:
    """SceMerge's merge (sce.py's __call__) once its selection and weights are found: `keep` a KEEP_KINDS kind
    of all, none or top (the variances before the cut (value, position))."""

    keep: int
    value: float
    position: int
    weights: tuple[float, ...]
    lam: float

    def into(self, out: memoryview, out_dtype: str, block: RawBlock) -> None:
        assert sce is not None
        sce(out, out_dtype, block.inputs, block.dtype, self.keep, self.value, self.position, self.weights, self.lam,
            block.start)
        _refuse_overflow(out, out_dtype, block)


def _refuse_overflow(out: memoryview, out_dtype: str, block: RawBlock) -> None:
    """A float16 pass's output: refused where a finite value overflowed to inf (recipe/overflow.py)."""
    if out_dtype == "F16":
        assert f16_infinities is not None
        if f16_infinities(out):
            refuse_raw_overflow(out, block)


def sce_energies(raw: RawBlocks, keep: int, value: float, position: int) -> list[float]:
    """Per model, the sum of squares of its task vector, zero outside the selected variances."""
    assert sce_energy is not None
    totals: list[float] = []
    for part in _halves(raw, lambda inputs, dtype, start: sce_energy(inputs, dtype, keep, value, position, start)):
        totals = list(part) if not totals else [t + p for t, p in zip(totals, part, strict=True)]
    return totals


def top_variance_cut(raw: RawBlocks, fraction: float, n: int) -> tuple[int, tuple[float, int] | None]:
    """k = floor(fraction * the count of nonzero variances over the task vectors), and the cut that keeps
    the k largest, ties by lowest position (select.top_cuts' cut); None where the sample's bracket missed it
    (or k is 0)."""
    assert variance_window is not None
    every = 1 if n < _WHOLE_SAMPLE else SAMPLE_EVERY
    sampled = _collected(raw, [(0, _ALL_BITS)], every, 2 * -(-n // (_CHUNK * every)) * _CHUNK + 4096,
                         _variance_scan)[0]
    sample = sampled[1]
    varying = np.count_nonzero(sample) / max(len(sample), 1)
    spread = fraction * float(np.sqrt(len(sample) * varying * (1 - varying)))  # where the sample puts k, too
    low, high, capacity = _bracket(sample, n - int(fraction * varying * n), n, spread)
    above, bits, positions, got, nonzero = _collected(raw, [(low, high)], 1, capacity, _variance_scan)[0]
    k = int(nonzero * fraction)
    return k, None if k == 0 else _cut_in_window(above, bits, positions, got, k, n)


def _variance_scan(bits: memoryview, positions: memoryview, inputs: tuple[memoryview, ...], dtype: str,
                   lows: tuple[int, ...], highs: tuple[int, ...], every: int, start: int) -> Any:
    assert variance_window is not None
    (above, collected), nonzero = variance_window(bits, positions, inputs, dtype, lows[0], highs[0], every, start)
    return ((above, collected, nonzero),)


def top_magnitude_cuts(raw: RawBlocks, counts: list[int | None], n: int) -> list[tuple[float, int] | None]:
    """Per model, the (value, position) cut that keeps exactly counts[model] of the largest |model - base|,
    ties at the last one kept by lowest position (select.top_cuts' cut, found in C); None where counts is.
    Two passes where the sample brackets a cut (a sample, then the window), the radix select where not."""
    assert magnitude_window is not None
    every = 1 if n < _WHOLE_SAMPLE else SAMPLE_EVERY
    sample = _collected(raw, [(0, _ALL_BITS) if k is not None else (1, 0) for k in counts], every,
                        2 * -(-n // (_CHUNK * every)) * _CHUNK + 4096)  # twice what it reads: blocks restart it
    bounds = [None if k is None else _bracket(sample[t][1], n - k, n) for t, k in enumerate(counts)]
    capacity = max((b[2] for b in bounds if b is not None), default=0)
    inside = _collected(raw, [(1, 0) if b is None else b[:2] for b in bounds], 1, capacity)
    cuts = [None if k is None else _cut_in_window(*inside[t][:4], k, n) for t, k in enumerate(counts)]
    missed = [None if k is None or cut is not None else k for k, cut in zip(counts, cuts, strict=True)]
    if any(k is not None for k in missed):
        cuts = [cut or radix for cut, radix in zip(cuts, _radix_cuts(raw, missed, n), strict=True)]
    return cuts


def rank_magnitude_cuts(raw: RawBlocks, ranks: list[list[int]], n: int) -> list[list[tuple[float, int]]] | None:
    """Per model, the (value, position) cut at each ascending rank of |model - base| in ranks[model], ties by
    position (select.rank_cuts' cuts): a sampled pass and a window pass, one stream per rank; None where a
    bracket missed (or there are more ranks than the kernel takes inputs)."""
    streams = [(t, rank) for t, wanted in enumerate(ranks) for rank in wanted]
    if not streams or len(streams) >= _MAX_INPUTS:
        return None if streams else [[] for _ in ranks]

    def streamed(sampled: bool = False) -> Iterator[RawBlock]:
        for block in raw(sampled):
            yield RawBlock(block.start, (block.inputs[0], *(block.inputs[t + 1] for t, _ in streams)), block.dtype)

    every = 1 if n < _WHOLE_SAMPLE else SAMPLE_EVERY
    sample = _collected(streamed, [(0, _ALL_BITS)] * len(streams), every, 2 * -(-n // (_CHUNK * every)) * _CHUNK + 4096)
    bounds = [_bracket(sample[s][1], rank, n) for s, (_, rank) in enumerate(streams)]
    inside = _collected(streamed, [b[:2] for b in bounds], 1, max(b[2] for b in bounds))
    found = [_rank_in_window(*inside[s][:4], rank, n) for s, (_, rank) in enumerate(streams)]
    if any(cut is None for cut in found):
        return None
    cuts: list[list[tuple[float, int]]] = [[] for _ in ranks]
    for (t, _), cut in zip(streams, found, strict=True):
        assert cut is not None
        cuts[t].append(cut)
    return cuts


def _rank_in_window(above: int, bits: np.ndarray, positions: np.ndarray, collected: int, rank: int, n: int
                    ) -> tuple[float, int] | None:
    """The entry of ascending `rank` (ties by position) from those inside the bracket; None when it lies
    outside or the bracket overflowed."""
    below = n - above - collected
    if collected > len(bits) or not below <= rank < below + collected:
        return None
    value = np.partition(bits, rank - below)[rank - below]
    nth = rank - below - int(np.count_nonzero(bits < value))  # how many entries equal to it rank below it
    position = 0 if nth == 0 else int(positions[bits == value][nth])  # 0: every equal entry is at or above it
    return float(np.array([value], dtype=np.uint32).view(np.float32)[0]), position


def _collected(raw: RawBlocks, bounds: list[tuple[int, int]], every: int, capacity: int, kernel: Any = None
               ) -> list[tuple[int, np.ndarray, np.ndarray, int, int]]:
    """Per stream (a model's magnitudes, or `kernel`'s scores): how many scores (as float32 bits) lie above its
    bounds, those within them (bits and positions, in order, as many as `capacity` holds), how many there
    were in all, and how many scores were nonzero (counted by the variance's kernel only). Each block's
    halves are read on two threads (the GIL is released), the second half's finds placed after the first's."""
    kernel = kernel or magnitude_window
    assert kernel is not None
    models = len(bounds)
    bits = np.empty((models, capacity), dtype=np.uint32)
    positions = np.empty((models, capacity), dtype=np.int64)
    above, got, nonzero = [0] * models, [0] * models, [0] * models
    lows, highs = tuple(b[0] for b in bounds), tuple(b[1] for b in bounds)
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per thread: flat buffers, reused block after block

    def scan(part: int, inputs: tuple[memoryview, ...], dtype: str, start: int, room: int) -> Any:
        if part not in parts or len(parts[part][0]) < models * room:
            parts[part] = (np.empty(models * room, np.uint32), np.empty(models * room, np.int64))
        part_bits, part_positions = (a[:models * room] for a in parts[part])
        return kernel(memoryview(part_bits), memoryview(part_positions), inputs, dtype, lows, highs, every, start)

    def place(found: Any, part: int, room: int) -> None:
        part_bits, part_positions = (a[:models * room].reshape(models, room) for a in parts[part])
        for t, (over, count, *nonzeros) in enumerate(found):
            nonzero[t] += sum(nonzeros)
            if got[t] + count <= capacity and count <= room:
                bits[t, got[t]:got[t] + count] = part_bits[t, :count]
                positions[t, got[t]:got[t] + count] = part_positions[t, :count]
            else:
                count = capacity + 1  # overflowed: its cut comes from the radix select
            above[t] += over
            got[t] += count

    for block in raw(sampled=every > 1):
        room = max([capacity - g for g in got if g <= capacity] or [0])  # an overflowed model's cut: the radix select's
        with _split(block, _CHUNK * every) as halves:  # whole sampled chunks in the first half
            if halves is None:
                place(scan(0, block.inputs, block.dtype, block.start, room), 0, room)
                continue
            first_half, second_half = halves
            later = _pool().submit(scan, 1, second_half.inputs, block.dtype, second_half.start, room)
            first = scan(0, first_half.inputs, block.dtype, block.start, room)
            second = later.result()
        place(first, 0, room)
        place(second, 1, room)
    return [(above[t], bits[t, :min(got[t], capacity)], positions[t, :min(got[t], capacity)], got[t], nonzero[t])
            for t in range(models)]


def _bracket(sample: np.ndarray, rank: int, n: int, spread: float = 0.0) -> tuple[int, int, int]:
    """Bounds (as score bits) that hold the entry of ascending `rank` among n, with a margin of _MARGIN
    standard deviations of where the sample places it (`spread`: a further deviation, in sample entries, of
    an estimated rank), and room for what they will collect."""
    size = len(sample)
    if size == 0:
        return 0, _ALL_BITS, n
    p = rank / n
    middle, spread = p * size, _MARGIN * (float(np.sqrt(size * p * (1 - p))) + spread) + 16
    low_rank, high_rank = int(middle - spread), int(middle + spread) + 1
    picks = [r for r in (low_rank, high_rank) if 0 <= r < size]
    chosen = np.partition(sample, picks) if picks else sample
    low = int(chosen[low_rank]) if 0 <= low_rank < size else 0
    high = int(chosen[high_rank]) if 0 <= high_rank < size else _ALL_BITS
    expected = (min(high_rank, size) - max(low_rank, 0)) / size * n
    return low, high, int(2 * expected) + 4096


def _cut_in_window(above: int, bits: np.ndarray, positions: np.ndarray, collected: int, k: int, n: int
                   ) -> tuple[float, int] | None:
    """The cut keeping the k largest, from the entries inside the bracket; None when the bracket missed it
    (the k-th largest lies above or below it) or overflowed its room (fewer kept than collected)."""
    need = k - above  # how many of the bracket's entries are kept, the largest first
    if collected > len(bits) or need <= 0 or need > collected:
        return None
    low = int(bits.min())
    if int(bits.max()) - low < 4 * collected:  # a narrow bracket: counted per value, not sorted
        per_value = np.bincount(bits - np.uint32(low))
        from_top = np.cumsum(per_value[::-1])
        value = np.uint32(low + len(per_value) - 1 - int(np.searchsorted(from_top, need)))
    else:
        value = np.partition(bits, collected - need)[collected - need]  # the smallest entry kept
    equal = positions[bits == value]
    nth = need - int(np.count_nonzero(bits > value))  # how many of the entries equal to it are kept
    position = n if nth >= len(equal) else int(equal[nth])
    return float(np.array([value], dtype=np.uint32).view(np.float32)[0]), position


def _radix_cuts(raw: RawBlocks, counts: list[int | None], n: int) -> list[tuple[float, int] | None]:
    """top_magnitude_cuts by a radix select on the magnitudes' bits: high 16 bits, then low 16 bits."""
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
        with _split(block) as parts:
            if parts is None:
                magnitude_counts(memoryview(halves[0]), block.inputs, block.dtype, wanted)
                continue
            later = _pool().submit(magnitude_counts, memoryview(halves[1]), parts[1].inputs, block.dtype, wanted)
            magnitude_counts(memoryview(halves[0]), parts[0].inputs, block.dtype, wanted)
            later.result()
    return sum(halves[1:], halves[0])


def _halves(raw: RawBlocks, kernel: Any, unit: int = 1) -> Iterator[Any]:
    """kernel(inputs, dtype, start) over every block, each block's halves (split at a multiple of `unit`) on two
    threads: their results."""
    for block in raw():
        with _split(block, unit) as halves:
            if halves is None:
                yield kernel(block.inputs, block.dtype, block.start)
                continue
            first, second = halves
            later = _pool().submit(kernel, second.inputs, block.dtype, second.start)
            done = kernel(first.inputs, block.dtype, block.start), later.result()
        yield from done


def _in_halves(part: Callable[[memoryview, str, RawBlock], None], out: memoryview, out_dtype: str, block: RawBlock,
               unit: int = 1) -> None:
    """A merge pass's part(out, out_dtype, block) on the block's two halves at once, the second on the helper
    thread (the kernels release the GIL): for the passes bound by computing, not by reading memory, where the
    writer thread mostly waits on them (benchmarks/bench_merge.py: dare_ties 0.87x the time, task arithmetic
    1.17x, ties and sce unchanged)."""
    with _split(block, unit) as halves:
        if halves is None:
            part(out, out_dtype, block)
            return
        first, second = halves
        width = (second.start - first.start) * DTYPE_SIZES[out_dtype]
        later = _pool().submit(part, out[width:], out_dtype, second)
        part(out[:width], out_dtype, first)
        later.result()


@contextmanager
def _split(block: RawBlock, unit: int = 1) -> Iterator[tuple[RawBlock, RawBlock] | None]:
    """The block's halves, split at a multiple of `unit` entries; None where it is too small to share (or
    there is one core). Their views are released on leaving, so the block's maps can close even while the
    helper thread still holds its finished call's arguments."""
    size = len(block.inputs[0]) // DTYPE_SIZES[block.dtype]
    cut = size // 2 // unit * unit
    if size < 1 << 16 or not _HELPERS or cut == 0:
        yield None
        return
    width = cut * DTYPE_SIZES[block.dtype]
    halves = (RawBlock(block.start, tuple(v[:width] for v in block.inputs), block.dtype),
              RawBlock(block.start + cut, tuple(v[width:] for v in block.inputs), block.dtype))
    try:
        yield halves
    finally:
        for half in halves:
            for view in half.inputs:
                view.release()


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
