"""A vocabulary-indexed tensor (embeddings, LM head) with its rows taken by token from other tensors: each
output row is one input row, or the mean of several (a token several models have and the model lacks).

Rows run in order wherever the token ids do, so the gather is kept as runs: a run of `length` output rows
starting at `start` is, row for row, the mean of the inputs' rows `first`.. (one pair per source). The
streamer reads a run's source rows block by block (surgery/recipe/stream.py), so memory stays a block.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from surgery.recipe.tensor import Unprepared

if TYPE_CHECKING:
    import torch

    from surgery.recipe.tensor import Block

Sources = tuple[tuple[int, int], ...]  # (input index, its first row), averaged
Run = tuple[int, int, Sources]  # (first output row, rows, sources)


def runs_of(rows: list[Sources]) -> tuple[Run, ...]:
    """Output rows' sources as runs: consecutive rows whose sources all advance by one row."""
    runs: list[Run] = []
    for index, sources in enumerate(rows):
        if runs:
            start, length, first = runs[-1]
            if all(j == k and row == r + length for (j, r), (k, row) in zip(first, sources)) \
                    and len(first) == len(sources):
                runs[-1] = (start, length + 1, first)
                continue
        runs.append((index, 1, sources))
    return tuple(runs)


@dataclass(frozen=True)
class RowGather(Unprepared):
    """Rows of the inputs, by run; `width` is the elements per row."""

    width: int
    runs: tuple[Run, ...]

    elementwise = True  # read through RecipeStreamer.gathered, never called on aligned blocks

    def __call__(self, inputs: Block) -> torch.Tensor:
        raise AssertionError("a RowGather is read by row (RecipeStreamer), not over aligned blocks")

    def between(self, first: int, last: int) -> list[Run]:
        """The runs that hold output rows [first, last)."""
        index = max(0, bisect_right(self._starts, first) - 1)
        found = []
        for run in self.runs[index:]:
            if run[0] >= last:
                break
            if run[0] + run[1] > first:
                found.append(run)
        return found

    @cached_property
    def _starts(self) -> list[int]:
        return [run[0] for run in self.runs]

    def describe(self) -> str:
        digest = hashlib.sha256(repr(self.runs).encode()).hexdigest()[:12]
        return f"rows aligned by token ({len(self.runs)} runs, {digest})"
