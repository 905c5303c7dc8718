"""Exact order statistics of a streamed tensor: the value at a rank, and where a tied value's n-th copy sits.

Trimming a task vector to its k largest entries (TIES), or to a band of ranks (breadcrumbs), or a
variance score to its top k (SCE), needs the k-th value of a tensor that may not fit in memory. It is
found exactly in two streaming passes, a radix select on the float32 bit patterns (for values >= 0
they order like integers), and ties at the cut are split by position in a third pass, so exactly k
entries are kept whatever the block size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery.recipe.tensor import Block, Blocks

if TYPE_CHECKING:
    import torch

Scores = Callable[[Block], Iterator["torch.Tensor"]]  # per stream, a block's scores (flat, float32, >= 0)
_BINS = 1 << 16


@dataclass(frozen=True)
class RankedValue:
    """The value at a rank of the ascending order, how many entries are smaller, how many equal it."""

    value: float
    lower: int
    equal: int


@dataclass(frozen=True)
class Cut:
    """A cut in the order of (score, position): the entry at it has score `value` and sits at `position`
    (n, the entry count, where the cut lies past every entry equal to `value`)."""

    value: float
    position: int

    def at_or_above(self, score: torch.Tensor, start: int) -> torch.Tensor:
        """Entries whose ascending rank (ties by position) is at least the cut's."""
        equal = score == self.value
        if self.position > start and bool(equal.any()):
            equal &= _positions(score, start) >= self.position
        return (score > self.value) | equal

    def before(self, score: torch.Tensor, start: int) -> torch.Tensor:
        """The top entries: a larger score, or an equal one at a position below the cut's."""
        equal = score == self.value
        if bool(equal.any()):
            equal &= _positions(score, start) < self.position
        return (score > self.value) | equal


def top_cuts(blocks: Blocks, scores: Scores, counts: list[int], n: int) -> list[Cut]:
    """Per stream, the cut whose `before` keeps exactly counts[stream] (in [1, n]) entries: the largest
    scores, ties at the last one kept by lowest position."""
    found = values_at(blocks, scores, [[n - k] for k in counts])
    nths = [k - (n - v.lower - v.equal) for k, (v,) in zip(counts, found, strict=True)]
    asks = [[(v.value, nth)] if nth < v.equal else [] for nth, (v,) in zip(nths, found, strict=True)]
    positions = nth_positions(blocks, scores, asks)
    return [Cut(v.value, at[0] if at else n) for (v,), at in zip(found, positions, strict=True)]


def rank_cuts(blocks: Blocks, scores: Scores, ranks: list[list[int]]) -> list[list[Cut]]:
    """Per stream, the cut at each ascending rank (ties by position) in ranks[stream] (each in [0, n))."""
    found = values_at(blocks, scores, ranks)
    asks = [[(v.value, rank - v.lower) for v, rank in zip(values, wanted, strict=True)]
            for values, wanted in zip(found, ranks, strict=True)]
    positions = nth_positions(blocks, scores, asks)
    return [[Cut(v, p) for (v, _), p in zip(stream, at, strict=True)]
            for stream, at in zip(asks, positions, strict=True)]


def values_at(blocks: Blocks, scores: Scores, ranks: list[list[int]]) -> list[list[RankedValue]]:
    """Per stream, the value at each 0-based ascending rank in `ranks[stream]` (each in [0, numel))."""
    import torch

    high: list[torch.Tensor] = []
    for block in blocks():
        for s, bits in enumerate(_bits(scores(block))):
            counts = torch.bincount(bits >> 16, minlength=_BINS)
            if s < len(high):
                high[s] += counts
            else:
                high.append(counts)
    placed = [[_bin_of(high[s].cpu(), rank) for rank in stream] for s, stream in enumerate(ranks)]
    wanted = [sorted({h for h, _ in stream}) for stream in placed]
    low: list[dict[int, torch.Tensor]] = [{} for _ in wanted]
    for block in blocks():
        for s, bits in enumerate(_bits(scores(block))):
            top = bits >> 16
            for h in wanted[s]:
                counts = torch.bincount(bits[top == h] & 0xFFFF, minlength=_BINS)
                low[s][h] = counts if h not in low[s] else low[s][h].add_(counts)
    out = []
    for s, stream in enumerate(placed):
        found = []
        for (h, below_high), rank in zip(stream, ranks[s], strict=True):
            counts = low[s][h].cpu()
            low_bin, below_low = _bin_of(counts, rank - below_high)
            pattern = torch.tensor([(h << 16) | low_bin], dtype=torch.int64).to(torch.int32)
            found.append(RankedValue(float(pattern.view(torch.float32)), below_high + below_low, int(counts[low_bin])))
        out.append(found)
    return out


def nth_positions(blocks: Blocks, scores: Scores, asks: list[list[tuple[float, int]]]) -> list[list[int]]:
    """Per stream, for each (value, n): the flat position of the n-th (0-based) entry equal to value,
    in position order. One streaming pass, stopped as soon as every position is found."""
    found = [[0 if n == 0 else -1 for _, n in stream] for stream in asks]
    seen = [[0] * len(stream) for stream in asks]
    pending = sum(p < 0 for stream in found for p in stream)
    if not pending:
        return found
    for block in blocks():
        for s, score in enumerate(scores(block)):
            for a, (value, n) in enumerate(asks[s]):
                if found[s][a] >= 0:
                    continue
                equal = score == value
                count = int(equal.sum())
                if seen[s][a] + count > n:
                    found[s][a] = block.start + int(equal.nonzero()[n - seen[s][a]])
                    pending -= 1
                seen[s][a] += count
        if not pending:
            break
    return found


def _bits(scores: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    import torch

    for score in scores:
        yield score.contiguous().view(torch.int32)


def _bin_of(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the entry of 0-based ascending `rank`, and how many entries lie in bins below it."""
    upto = counts.cumsum(0)
    index = int((upto > rank).nonzero()[0])
    return index, int(upto[index] - counts[index])


def _positions(score: torch.Tensor, start: int) -> torch.Tensor:
    import torch

    return torch.arange(start, start + score.numel(), device=score.device)
