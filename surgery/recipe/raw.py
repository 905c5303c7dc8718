"""What the fused passes (compute/fused.py) read: a recipe's stored inputs as raw bytes, part by part, and
how a pass writes its output block. The streamer makes the parts; the computes decide whether a pass exists."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

FUSED_DTYPES = frozenset({"BF16", "F16", "F32"})  # what the kernels decode and encode


@dataclass(frozen=True)
class RawBlock:
    """Elements [start, start + n) of every input of a recipe, the stored bytes (all of one dtype)."""

    start: int
    inputs: tuple[memoryview, ...]
    dtype: str


class RawBlocks(Protocol):
    def __call__(self, sampled: bool = False) -> Iterator[RawBlock]:
        """A fresh pass; each block's views are valid until the next. `sampled`: the pass reads a small part
        of each block, so its pages are not read in ahead."""


class FusedPass(Protocol):
    def into(self, out: memoryview, out_dtype: str, block: RawBlock) -> None:
        """Write the output of the block's elements into `out`, in `out_dtype`."""
