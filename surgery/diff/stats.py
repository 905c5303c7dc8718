"""How much a tensor changed: norms, cosine, max difference, computed in float32 over row blocks so
memory is bounded by a block, not by the tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.reader import TensorInfo

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


class TensorLoader:
    """safetensors handles kept open; row blocks read lazily (memory-mapped by safetensors)."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}
        self._sketches: dict[TensorInfo, Any] = {}

    def rows(self, info: TensorInfo, start: int, stop: int) -> Any:
        from safetensors import safe_open

        if info.file not in self._handles:
            self._handles[info.file] = safe_open(info.file, framework="pt")
        handle = self._handles[info.file]
        if not info.shape:
            return handle.get_tensor(info.name).reshape(1)
        return handle.get_slice(info.name)[start:stop]

    def sketch(self, info: TensorInfo, rows: int = 8) -> Any:
        """A few evenly spaced rows (the whole tensor when small), flattened to float32."""
        import torch

        if info not in self._sketches:
            if len(info.shape) < 2 or info.shape[0] <= rows:
                sketch = self.rows(info, 0, info.shape[0] if info.shape else 1).float().reshape(-1)
            else:
                picks = torch.linspace(0, info.shape[0] - 1, rows).round().long().tolist()
                sketch = torch.cat([self.rows(info, i, i + 1).float().reshape(-1) for i in picks])
            self._sketches[info] = sketch
        return self._sketches[info]


def measure(loader: TensorLoader, a: TensorInfo, b: TensorInfo, atol: float, rtol: float) -> Change:
    """Change from A to B (same shape), in float32, block of rows by block of rows."""
    import torch

    rows = a.shape[0] if a.shape else 1
    per_row = max(1, math.prod(a.shape[1:]) if a.shape else 1)
    step = max(1, BLOCK_ELEMENTS // per_row)
    total = ZERO
    for start in range(0, rows, step):
        block_a = loader.rows(a, start, start + step).float()
        block_b = loader.rows(b, start, start + step).float()
        delta = block_b - block_a
        f64 = torch.float64  # products in float32, sums accumulated in float64
        total = total + Change(
            diff_sq=float((delta * delta).sum(dtype=f64)), a_sq=float((block_a * block_a).sum(dtype=f64)),
            b_sq=float((block_b * block_b).sum(dtype=f64)), dot=float((block_a * block_b).sum(dtype=f64)),
            max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
            within_tolerance=bool(torch.all(delta.abs() <= atol + rtol * block_a.abs())),
        )
    return total
