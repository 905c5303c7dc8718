"""How much a tensor changed: norms, cosine, max difference, computed in float32 over row blocks so
memory is bounded by a block, not by the tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from surgery.checkpoint.reader import TensorInfo
from surgery.errors import SurgeryError

BLOCK_ELEMENTS = 1 << 22


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


TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class TensorLoader:
    """Reads row blocks of tensors into reused buffers: no memory map (whose touched pages would count
    against the process), no fresh allocation per block (page faults cost more than the arithmetic)."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}
        self._sketches: dict[TensorInfo, Any] = {}
        self._raw = [bytearray(), bytearray()]
        self._floats: list[Any] = [None] * 4  # torch is imported only when something must be decoded

    def _read_into(self, slot: int, info: TensorInfo, offset: int, size: int) -> memoryview:
        handle = self._files.get(info.file)
        if handle is None:
            handle = self._files[info.file] = open(info.file, "rb")
        if len(self._raw[slot]) < size:
            self._raw[slot] = bytearray(size)
        view = memoryview(self._raw[slot])[:size]
        handle.seek(info.start + offset)
        if handle.readinto(view) != size:
            raise SurgeryError(f"{info.file}: unexpected end of file reading {info.name}")
        return view

    def floats(self, slot: int, info: TensorInfo, start_row: int, stop_row: int) -> Any:
        """Rows [start_row, stop_row) of a tensor as float32, in buffer `slot` (valid until reused)."""
        import torch

        per_row = info.nbytes // (info.shape[0] if info.shape else 1)
        raw = self._read_into(slot, info, start_row * per_row, (stop_row - start_row) * per_row)
        source = torch.frombuffer(raw, dtype=getattr(torch, TORCH_DTYPES[info.dtype])) if len(raw) else torch.empty(0)
        out = self.scratch(slot, source.numel())
        out.copy_(source)
        return out

    def scratch(self, slot: int, numel: int) -> Any:
        """Float32 working buffer `slot` of `numel` elements (0, 1: decoded inputs; 2, 3: results)."""
        import torch

        if self._floats[slot] is None or self._floats[slot].numel() < numel:
            self._floats[slot] = torch.empty(numel)
        return self._floats[slot][:numel]

    def sketch(self, info: TensorInfo, rows: int = 8) -> Any:
        """A few evenly spaced rows (the whole tensor when small), flattened to float32."""
        import torch

        if info not in self._sketches:
            count = info.shape[0] if info.shape else 1
            picks = range(count) if len(info.shape) < 2 or count <= rows else \
                torch.linspace(0, count - 1, rows).round().long().tolist()
            self._sketches[info] = torch.cat([self.floats(0, info, i, i + 1).clone() for i in picks])
        return self._sketches[info]

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def measure(loader: TensorLoader, a: TensorInfo, b: TensorInfo, atol: float, rtol: float) -> Change:
    """Change from A to B (same shape), in float32, block of rows by block of rows."""
    import torch

    rows = a.shape[0] if a.shape else 1
    per_row = max(1, math.prod(a.shape[1:]) if a.shape else 1)
    step = max(1, BLOCK_ELEMENTS // per_row)
    diff_sq = a_sq = b_sq = dot = max_abs = 0.0
    within = True
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block_a = loader.floats(0, a, start, stop)
        block_b = loader.floats(1, b, start, stop)
        delta = torch.sub(block_b, block_a, out=loader.scratch(2, block_a.numel()))
        product = loader.scratch(3, block_a.numel())
        # multiply into a buffer, then torch's cascade sum (BLAS dot loses ~1e-5 relative at this size);
        # with B = A + D: ||B||^2 = ||A||^2 + 2<A,D> + ||D||^2 and <A,B> = ||A||^2 + <A,D>
        block_d_sq = float(torch.mul(delta, delta, out=product).sum())
        block_a_sq = float(torch.mul(block_a, block_a, out=product).sum())
        block_ad = float(torch.mul(block_a, delta, out=product).sum())
        diff_sq += block_d_sq
        a_sq += block_a_sq
        b_sq += block_a_sq + 2 * block_ad + block_d_sq
        dot += block_a_sq + block_ad
        if delta.numel():
            low, high = torch.aminmax(delta)
            max_abs = max(max_abs, -float(low), float(high))
        if atol or rtol:
            within = within and bool(torch.all(delta.abs_() <= atol + rtol * block_a.abs()))
        else:
            within = within and max_abs == 0.0
    return Change(diff_sq, a_sq, b_sq, dot, max_abs, within)
