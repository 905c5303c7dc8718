"""What the fused passes (compute/fused.py) read: a recipe's stored inputs as raw bytes, part by part, and
how a pass writes its output block. The streamer makes the parts; the computes decide whether a pass exists."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

FUSED_DTYPES = frozenset({"BF16", "F16", "F32"})  # what the kernels decode and encode


@dataclass(frozen=True)
class RawBlock:
    """Elements [start, start + n) of every input of a recipe, the stored bytes (all of one dtype)."""

    start: int
    inputs: tuple[memoryview, ...]
    dtype: str


RawBlocks = Callable[[], Iterator[RawBlock]]  # a fresh pass; each block's views are valid until the next


class FusedPass(Protocol):
    def into(self, out: memoryview, out_dtype: str, block: RawBlock) -> None:
        """Write the output of the block's elements into `out`, in `out_dtype`."""
