"""Run tensor recipes block by block on cpu or cuda, so memory is bounded by a block, not a tensor.

The executor writes the blocks' bytes; data-dependent fits (LiNeS norms) read their values. Inputs
are read straight from the source files into reused buffers; elementwise computes see aligned
blocks of their flattened inputs, others whole tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from surgery.checkpoint.blocks import BlockReader, torch_dtype
from surgery.checkpoint.reader import TensorInfo, numel
from surgery.view import Compute, TensorRecipe

if TYPE_CHECKING:
    import torch

# Small enough that a block's buffers stay in cache between the compute's passes (4x faster than
# 4M-element blocks here, benchmarks/bench_merge.py), large enough that Python's overhead is noise.
CPU_BLOCK_ELEMENTS = 1 << 18
GPU_BLOCK_ELEMENTS = 1 << 24


class RecipeStreamer:
    """Streams computed recipes; one per run (it holds open files and reused buffers)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.reader = BlockReader()
        self.block = CPU_BLOCK_ELEMENTS if device == "cpu" else GPU_BLOCK_ELEMENTS
        self._out: dict[tuple[str, int], torch.Tensor] = {}
        self._threads = 0  # torch's thread count before the first compute, restored at close

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

    def blocks(self, recipe: TensorRecipe) -> Iterator[list[torch.Tensor]]:
        """The inputs, float32 on the device: aligned blocks for elementwise computes, else whole tensors."""
        assert recipe.compute is not None
        if not recipe.compute.elementwise:
            yield [self._read(i, info, 0, numel(info.shape)).reshape(info.shape) for i, info in enumerate(recipe.inputs)]
            return
        total = numel(recipe.shape)
        for start in range(0, total, self.block):
            stop = min(total, start + self.block)
            yield [self._read(i, info, start, stop) for i, info in enumerate(recipe.inputs)]

    def _read(self, slot: int, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        if self.device == "cpu":
            return self.reader.floats(slot, info, start, stop)
        import torch

        raw = self.reader.raw(slot, info, start, stop)  # the narrow dtype crosses the bus, then widens
        return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).to(self.device).float()

    def prepared(self, recipe: TensorRecipe) -> Compute:
        assert recipe.compute is not None
        return recipe.compute.prepare(lambda: self.blocks(recipe))

    def values(self, recipe: TensorRecipe) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """(input blocks, output block) pairs; the compute may have overwritten the inputs."""
        import torch

        self._pin_threads()
        compute = self.prepared(recipe)
        whole = bool(self._threads) and not compute.elementwise  # one big op (an SVD): every core helps
        if whole:
            torch.set_num_threads(self._threads)
        try:
            for inputs in self.blocks(recipe):
                yield inputs, compute(inputs)
        finally:
            if whole:
                torch.set_num_threads(1)

    def encoded(self, recipe: TensorRecipe) -> Iterator[memoryview]:
        """The output's bytes in the recipe's dtype, block by block, in two buffers used in turn: a
        block stays valid while the next one is computed (so the writer can overlap the two)."""
        import torch

        for count, (_, value) in enumerate(self.values(recipe)):
            flat = value.reshape(-1)
            key = (recipe.dtype, count % 2)
            buffer = self._out.get(key)
            if buffer is None or buffer.numel() < flat.numel():
                buffer = self._out[key] = torch.empty(flat.numel(), dtype=torch_dtype(recipe.dtype))
            out = buffer[: flat.numel()]
            out.copy_(flat)  # from the device too
            yield memoryview(out.view(torch.uint8).numpy())
