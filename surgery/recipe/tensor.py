"""One tensor and how it is made: a stored tensor's bytes, or a compute over other tensors.

A tensor recipe is also the handle an op reads a tensor through. Its inputs are recipes too, so a
tensor an earlier step computed (a compact model's depth, a merge's output) is read exactly as it
would be stored, and no op needs to know where in which file a tensor lives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from surgery.checkpoint.reader import DTYPE_SIZES, TensorInfo, numel

if TYPE_CHECKING:
    import torch


_Self = TypeVar("_Self")


class Block(list):  # type: ignore[type-arg]
    """A compute's inputs for one block (float32 tensors, one per input), and where the block starts in
    the flattened tensor: a compute that depends on position (a seeded mask, a tie broken by position,
    a statistic per row) reads `start`, so its output does not depend on how the tensor is cut."""

    def __init__(self, tensors: list[torch.Tensor], start: int = 0) -> None:
        super().__init__(tensors)
        self.start = start


Blocks = Callable[[], Iterator[Block]]  # a fresh pass over a recipe's input blocks


class Compute(Protocol):
    """A pure tensor function; `describe` makes recipes printable and hashable.

    Inputs arrive as float32 blocks the compute may overwrite; it returns a float tensor, which the
    executor casts to the recipe's dtype. An `elementwise` compute gets aligned blocks of its flattened
    inputs, so a tensor of any size streams through bounded memory; otherwise it gets whole tensors.
    `prepare` sees every block once before the first call, for whole-tensor statistics (thresholds).
    A compute with `whole_rows` gets blocks that hold whole rows (of the tensor's last dimension).
    """

    elementwise: bool

    def __call__(self, inputs: Block) -> torch.Tensor: ...

    def prepare(self, blocks: Blocks) -> Compute: ...

    def describe(self) -> str: ...


class Unprepared:
    """Base of the computes that need no whole-tensor statistics before their first block."""

    def prepare(self: _Self, blocks: Blocks) -> _Self:
        return self


@dataclass(frozen=True)
class TensorRecipe:
    """A tensor's dtype and shape, and how it is made: `stored` names a checkpoint tensor whose raw
    bytes it is (copied, never decoded); otherwise `compute` makes it from `inputs`, each read as it
    would be stored (a computed input is rounded to its own dtype)."""

    dtype: str
    shape: tuple[int, ...]
    stored: TensorInfo | None = None
    inputs: tuple[TensorRecipe, ...] = ()
    compute: Compute | None = None

    @classmethod
    def copy_of(cls, info: TensorInfo) -> TensorRecipe:
        return cls(dtype=info.dtype, shape=info.shape, stored=info)

    @classmethod
    def computed(cls, dtype: str, shape: tuple[int, ...], inputs: tuple[TensorRecipe, ...],
                 compute: Compute) -> TensorRecipe:
        return cls(dtype=dtype, shape=shape, inputs=inputs, compute=compute)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_SIZES[self.dtype]

    def describe(self) -> str:
        if self.stored is not None:
            return f"copy {self._source()}"
        assert self.compute is not None
        sources = ", ".join(i._source() for i in self.inputs)
        return f"{self.compute.describe()} of {sources}" if sources else self.compute.describe()

    def _source(self) -> str:
        """`folder/name` of a stored tensor, the description in parentheses of a computed one."""
        if self.stored is not None:
            return f"{self.stored.file.parent.name}/{self.stored.name}"
        return f"({self.describe()})"
