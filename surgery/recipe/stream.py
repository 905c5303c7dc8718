"""Run tensor recipes block by block on cpu or cuda, so memory is bounded by a block, not a tensor.

The executor writes the blocks' bytes; data-dependent fits read their values. Stored inputs are
read straight from the source files into reused buffers; elementwise computes see aligned blocks of
their flattened inputs, others whole tensors. An input that is itself computed is made the same
way and rounded to its own dtype, exactly as if it had been written and read back; one that needs
whole tensors is made once per output tensor and sliced.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

from surgery.checkpoint.blocks import BlockReader, torch_dtype
from surgery.checkpoint.reader import DTYPE_SIZES, numel
from surgery.recipe.overflow import refuse_torch_overflow
from surgery.recipe.raw import FUSED_DTYPES, FusedPass, RawBlock, RawBlocks
from surgery.recipe.rows import RowGather
from surgery.recipe.tensor import Block, Compute, TensorRecipe, Unprepared

if TYPE_CHECKING:
    import torch

# Small enough that a block's buffers stay in cache between the compute's passes (4x faster than
# 4M-element blocks here, benchmarks/bench_merge.py), large enough that Python's overhead is noise.
CPU_BLOCK_ELEMENTS = 1 << 18
GPU_BLOCK_ELEMENTS = 1 << 24
# The fused passes read each input straight from the page cache through a memory map (no copy into a
# buffer); parts this large keep the maps few, and a part's pages stay bounded (8 MiB per bf16 input).
FUSED_BLOCK_ELEMENTS = 1 << 22


class RecipeStreamer:
    """Streams computed recipes; one per run (it holds open files and reused buffers)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.reader = BlockReader()
        self.block = CPU_BLOCK_ELEMENTS if device == "cpu" else GPU_BLOCK_ELEMENTS
        self._out: dict[tuple[str, int], torch.Tensor] = {}
        self._fused_out: list[bytearray] = [bytearray(), bytearray()]
        self._threads = 0  # torch's thread count before the first compute, restored at close
        # Per output tensor: its computed inputs' prepared computes and whole values (dropped when
        # the next output tensor starts, so they cost at most one tensor's inputs).
        self._current: TensorRecipe | None = None
        self._prepared: dict[int, Compute] = {}
        self._whole: dict[int, torch.Tensor] = {}

    def _pin_threads(self) -> None:
        """One compute thread on CPU: blocks this small gain nothing from two, and the writer needs a
        core. Done at the first compute, so a run that only copies never imports torch."""
        if self.device == "cpu" and not self._threads:
            import torch

            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def close(self) -> None:
        self.reader.close()
        if self._threads:
            import torch

            torch.set_num_threads(self._threads)

    def blocks(self, recipe: TensorRecipe) -> Iterator[Block]:
        """A computed recipe's inputs, float32 on the device: aligned blocks for an elementwise
        compute, else whole tensors in their shapes."""
        self._start(recipe)
        return self._blocks(recipe, ())

    def prepared(self, recipe: TensorRecipe) -> Compute:
        self._start(recipe)
        return self._prepare(recipe, ())

    def values(self, recipe: TensorRecipe) -> Iterator[tuple[Block, torch.Tensor]]:
        """(input blocks, output block) pairs; the compute may have overwritten the inputs."""
        import torch

        self._pin_threads()
        compute = self.prepared(recipe)
        whole = bool(self._threads) and not compute.elementwise  # one big op (an SVD): every core helps
        if whole:
            torch.set_num_threads(self._threads)
        try:
            for inputs in self._blocks(recipe, ()):
                yield inputs, compute(inputs)
        finally:
            if whole:
                torch.set_num_threads(1)

    def encoded(self, recipe: TensorRecipe) -> Iterator[memoryview]:
        """The output's bytes in the recipe's dtype, block by block, in two buffers used in turn: a
        block stays valid while the next one is computed (so the writer can overlap the two)."""
        fused = self._fused_pass(recipe)
        return self._torch_encoded(recipe) if fused is None else self._fused_encoded(recipe, fused)

    def _raw_readable(self, recipe: TensorRecipe) -> bool:
        """Whether the fused passes can read the recipe's inputs: all stored, of one dtype they decode, on CPU."""
        dtypes = {r.stored.dtype if r.stored is not None else None for r in recipe.inputs}
        return (self.device == "cpu" and len(dtypes) == 1
                and next(iter(dtypes)) in FUSED_DTYPES and getattr(recipe.compute, "elementwise", False))

    def _fused_pass(self, recipe: TensorRecipe) -> FusedPass | None:
        """The recipe as one of the fused passes, when it is one and they can make it."""
        if recipe.dtype not in FUSED_DTYPES or not hasattr(recipe.compute, "fused_pass") \
                or not self._raw_readable(recipe):
            return None
        if not isinstance(recipe.compute, Unprepared):
            self._pin_threads()  # its statistics (slerp's angles) may be found by torch, in prepare
        return self.prepared(recipe).fused_pass()

    def _raw_blocks(self, recipe: TensorRecipe, sampled: bool = False) -> Iterator[RawBlock]:
        """The inputs' stored bytes, part by part, straight from the page cache through memory maps (read in
        ahead, unless the pass only samples them)."""
        total, step = numel(recipe.shape), self._block_of(recipe, FUSED_BLOCK_ELEMENTS)
        dtype = recipe.inputs[0].dtype
        for start in range(0, total, step):
            stop = min(total, start + step)
            with ExitStack() as maps:
                views = (maps.enter_context(self.reader.mapped(r.stored, start, stop, populate=not sampled))
                         for r in recipe.inputs)
                yield RawBlock(start, tuple(views), dtype)

    def _fused_encoded(self, recipe: TensorRecipe, fused: FusedPass) -> Iterator[memoryview]:
        size = DTYPE_SIZES[recipe.dtype]
        for count, block in enumerate(self._raw_blocks(recipe)):
            nbytes = len(block.inputs[0]) // DTYPE_SIZES[block.dtype] * size
            if len(self._fused_out[count % 2]) < nbytes:
                self._fused_out[count % 2] = bytearray(nbytes)
            out = memoryview(self._fused_out[count % 2])[:nbytes]
            fused.into(out, recipe.dtype, block)  # a float16 pass refuses an overflow itself
            yield out

    def _torch_encoded(self, recipe: TensorRecipe) -> Iterator[memoryview]:
        import torch

        for count, (_, value) in enumerate(self.values(recipe)):
            flat = value.reshape(-1)
            key = (recipe.dtype, count % 2)
            buffer = self._out.get(key)
            if buffer is None or buffer.numel() < flat.numel():
                buffer = self._out[key] = torch.empty(flat.numel(), dtype=torch_dtype(recipe.dtype))
            out = buffer[: flat.numel()]
            out.copy_(flat)  # from the device too
            if recipe.dtype == "F16":
                refuse_torch_overflow(flat, out)
            yield memoryview(out.view(torch.uint8).numpy())

    def whole(self, recipe: TensorRecipe) -> torch.Tensor:
        """A tensor's value, float32 on the device in its shape, whether stored or computed (a fresh
        tensor the caller owns)."""
        self._start(recipe)
        return self._read(recipe, ("whole",), 0, numel(recipe.shape)).reshape(recipe.shape).clone()

    def _start(self, recipe: TensorRecipe) -> None:
        if recipe is not self._current:
            self._current = recipe
            self._prepared.clear()
            self._whole.clear()

    def _prepare(self, recipe: TensorRecipe, slot: tuple[Hashable, ...]) -> Compute:
        prepared = self._prepared.get(id(recipe))
        if prepared is None:
            assert recipe.compute is not None
            blocks = _Blocks(lambda: self._blocks(recipe, slot),
                             (lambda sampled=False: self._raw_blocks(recipe, sampled)) if self._raw_readable(recipe) else None)
            prepared = self._prepared[id(recipe)] = recipe.compute.prepare(blocks)
        return prepared

    def _blocks(self, recipe: TensorRecipe, slot: tuple[Hashable, ...]) -> Iterator[Block]:
        assert recipe.compute is not None
        if not recipe.compute.elementwise:
            yield Block([self._read(r, (*slot, i), 0, numel(r.shape)).reshape(r.shape)
                         for i, r in enumerate(recipe.inputs)])
            return
        total, step = numel(recipe.shape), self._block_of(recipe)
        for start in range(0, total, step):
            stop = min(total, start + step)
            yield Block([self._read(r, (*slot, i), start, stop) for i, r in enumerate(recipe.inputs)], start)

    def _block_of(self, recipe: TensorRecipe, block: int | None = None) -> int:
        """Elements per block: the streamer's block (or `block`), or whole rows for a compute that needs them."""
        block = block or self.block
        if not getattr(recipe.compute, "whole_rows", False):
            return block
        row = recipe.shape[-1] if recipe.shape else 1
        return max(1, block // max(row, 1)) * max(row, 1)

    def _read(self, recipe: TensorRecipe, slot: tuple[Hashable, ...], start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor, flattened, float32 on the device (a buffer of `slot`)."""
        if recipe.stored is not None:
            if self.device == "cpu":
                return self.reader.floats(slot, recipe.stored, start, stop)
            import torch

            raw = self.reader.raw(slot, recipe.stored, start, stop)  # the narrow dtype crosses the bus, then widens
            return torch.frombuffer(raw, dtype=torch_dtype(recipe.stored.dtype)).to(self.device).float()
        compute = self._prepare(recipe, slot)
        if isinstance(compute, RowGather):
            return self._gathered(recipe, compute, slot, start, stop)
        if compute.elementwise:
            first, last = start, stop
            if getattr(compute, "whole_rows", False):  # widen to whole rows, compute, then cut back
                row = max(recipe.shape[-1] if recipe.shape else 1, 1)
                first, last = start - start % row, -(-stop // row) * row
            inputs = Block([self._read(r, (*slot, i), first, last) for i, r in enumerate(recipe.inputs)], first)
            value = self._as_stored(compute(inputs), recipe.dtype)
            return value if (first, last) == (start, stop) else value[start - first: stop - first].clone()
        value = self._whole.get(id(recipe))
        if value is None:
            inputs = next(self._blocks(recipe, slot))
            value = self._whole[id(recipe)] = self._as_stored(compute(inputs), recipe.dtype).reshape(-1)
        return value[start:stop].clone()  # the reader may overwrite its inputs in place

    def _gathered(self, recipe: TensorRecipe, gather: RowGather, slot: tuple[Hashable, ...], start: int,
                  stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor whose rows come from its inputs' rows (surgery/recipe/rows.py):
        the rows that hold them, read run by run, then cut back."""
        import torch

        width = gather.width
        first, last = start // width, -(-stop // width)
        parts = []
        for run_start, length, sources in gather.between(first, last):
            lo, hi = max(first, run_start), min(last, run_start + length)
            total: torch.Tensor | None = None
            for j, row in sources:
                at = row + lo - run_start
                piece = self._read(recipe.inputs[j], (*slot, "rows", j), at * width, (at + hi - lo) * width).clone()
                total = piece if total is None else total.add_(piece)
            assert total is not None
            parts.append(total / len(sources) if len(sources) > 1 else total)
        value = self._as_stored(torch.cat(parts), recipe.dtype)
        offset = start - first * width
        return value[offset: offset + stop - start]

    @staticmethod
    def _as_stored(value: torch.Tensor, dtype: str) -> torch.Tensor:
        """The float32 value a tensor of `dtype` holding `value` reads back as."""
        return value.float() if dtype == "F32" else value.to(torch_dtype(dtype)).float()


class _Blocks:
    """A pass over a recipe's input blocks (float32, for torch), and, where the fused passes can read them,
    over their raw bytes too (`raw`, for compute/fused.py)."""

    def __init__(self, blocks: Callable[[], Iterator[Block]], raw: RawBlocks | None) -> None:
        self._blocks = blocks
        self.raw = raw

    def __call__(self) -> Iterator[Block]:
        return self._blocks()
