"""PTQTP (Xiao et al. 2025, "PTQTP: Post-Training Quantization to Trit-Planes for Large Language Models"):
each group of a weight row as a1 t1 + a2 t2, with t1, t2 in {-1, 0, 1}^g and two real scales.

The fit alternates two exact minimisations of F = ||w - a1 t1 - a2 t2||^2 + lambda ||a||^2 per group:
- the trits given the scales: each weight takes the nearest of the 9 values a1 i + a2 j, i, j in {-1, 0, 1};
- the scales given the trits: the closed-form ridge solution a = (S^T S + lambda I)^-1 S^T w, S = [t1 t2];
so F never increases from one iteration to the next (the paper's monotone error), and the fit stops when
an iteration lowers it by less than `tolerance` (relative). It starts progressively, as the paper does:
plane 1 approximates the weights (ternary, threshold 0.7 mean |w|), plane 2 what plane 1 leaves.

Trits are packed five to a byte (3^5 = 243 <= 256): sum_k (t_k + 1) 3^k, first trit least significant;
two planes take 3.2 bits per weight, plus two scales per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from surgery.checkpoint.blocks import torch_dtype
from surgery.compute.quantize import require_finite
from surgery.recipe.tensor import Unprepared

if TYPE_CHECKING:
    import torch

RIDGE = 1e-3  # lambda, in units of trit counts (S^T S counts a group's nonzero trits)
TRITS_PER_BYTE = 5
ROWS_PER_CHUNK = 1 << 20  # group-rows whose 9 candidate values are held at once, bounding memory
TritPart = Literal["dense", "trits_1", "trits_2", "scales"]


@dataclass(frozen=True)
class TritPlanes:
    planes: tuple[torch.Tensor, torch.Tensor]  # int8 in {-1, 0, 1}, the weight's shape
    scales: torch.Tensor  # (rows, groups, 2), stored dtype
    objective: list[float] = field(default_factory=list)  # F after the start and after each iteration

    def dense(self) -> torch.Tensor:
        """a1 t1 + a2 t2 group by group, in the scales' dtype."""
        rows, columns = self.planes[0].shape
        groups = self.scales.shape[1]
        t1, t2 = (p.reshape(rows, groups, columns // groups).to(self.scales.dtype) for p in self.planes)
        return (t1 * self.scales[..., :1] + t2 * self.scales[..., 1:]).reshape(rows, columns)


def fit(weight: torch.Tensor, group_size: int, iterations: int, dtype: torch.dtype,
        tolerance: float = 1e-6) -> TritPlanes:
    """Two trit-planes and their scales for a 2-D weight, fitted in float64; scales stored in `dtype`."""
    import torch

    rows, columns = weight.shape
    w = weight.double().reshape(-1, group_size)  # one group of one row per line
    t1 = _ternary(w)
    t2 = _ternary(w - _single_scale(w, t1) * t1)
    scales = _ridge(w, t1, t2)
    objective = [_objective(w, t1, t2, scales)]
    for _ in range(iterations):
        t1, t2 = _nearest_trits(w, scales)
        scales = _ridge(w, t1, t2)
        objective.append(_objective(w, t1, t2, scales))
        if objective[-2] - objective[-1] <= tolerance * objective[-2]:
            break
    planes = (t1.reshape(rows, columns).to(torch.int8), t2.reshape(rows, columns).to(torch.int8))
    return TritPlanes(planes, scales.reshape(rows, columns // group_size, 2).to(dtype), objective)


def _ternary(w: torch.Tensor) -> torch.Tensor:
    threshold = 0.7 * w.abs().mean(-1, keepdim=True)
    return w.sign() * (w.abs() > threshold)


def _single_scale(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (w * t).sum(-1, keepdim=True) / ((t * t).sum(-1, keepdim=True) + RIDGE)


def _ridge(w: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Per group, (S^T S + lambda I)^-1 S^T w for S = [t1 t2], solved in closed form (2 x 2)."""
    import torch

    a11, a22, a12 = (t1 * t1).sum(-1) + RIDGE, (t2 * t2).sum(-1) + RIDGE, (t1 * t2).sum(-1)
    b1, b2 = (t1 * w).sum(-1), (t2 * w).sum(-1)
    determinant = a11 * a22 - a12 * a12  # > 0: lambda > 0 and Cauchy-Schwarz
    return torch.stack(((a22 * b1 - a12 * b2) / determinant, (a11 * b2 - a12 * b1) / determinant), -1)


def _nearest_trits(w: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's nearest value a1 i + a2 j (the first of equals in the fixed order of (i, j))."""
    import torch

    pairs = torch.tensor([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=w.dtype, device=w.device)
    t1, t2 = torch.empty_like(w), torch.empty_like(w)
    step = max(1, ROWS_PER_CHUNK // w.shape[1])
    for first in range(0, w.shape[0], step):
        chunk = slice(first, first + step)
        values = scales[chunk] @ pairs.T  # (rows, 9)
        choice = (w[chunk].unsqueeze(-1) - values.unsqueeze(1)).abs().argmin(-1)
        t1[chunk], t2[chunk] = pairs[choice, 0], pairs[choice, 1]
    return t1, t2


def _objective(w: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, scales: torch.Tensor) -> float:
    error = w - scales[:, :1] * t1 - scales[:, 1:] * t2
    return float(error.square().sum() + RIDGE * scales.square().sum())


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits, rows of any length, as uint8 bytes of five (the last byte of a row padded with 0s)."""
    import torch

    rows, columns = trits.shape
    width = -(-columns // TRITS_PER_BYTE) * TRITS_PER_BYTE
    digits = torch.ones(rows, width, dtype=torch.int32, device=trits.device)  # padding: trit 0, digit 1
    digits[:, :columns] = trits.to(torch.int32) + 1
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int32, device=trits.device)
    return (digits.reshape(rows, -1, TRITS_PER_BYTE) * powers).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, columns: int) -> torch.Tensor:
    import torch

    values = packed.to(torch.int32).unsqueeze(-1)
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int32, device=packed.device)
    digits = (values // powers) % 3
    return (digits.reshape(packed.shape[0], -1)[:, :columns] - 1).to(torch.int8)


@dataclass(frozen=True)
class TritFit(Unprepared):
    """PTQTP of a whole matrix; outputs its dense form or one stored part (a packed plane, the scales)."""

    group_size: int
    iterations: int
    dtype: str
    part: TritPart = "dense"
    elementwise = False

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        require_finite(inputs[0], "PTQTP", "ptqtp")
        planes = fit(inputs[0], self.group_size, self.iterations, torch_dtype(self.dtype))
        if self.part == "dense":
            return planes.dense()
        if self.part == "scales":
            return planes.scales
        return pack_trits(planes.planes[0 if self.part == "trits_1" else 1])

    def describe(self) -> str:
        return f"PTQTP two trit-planes, groups of {self.group_size}, up to {self.iterations} iterations, {self.part}"


@dataclass(frozen=True)
class FromTrits(Unprepared):
    """The dense weight of stored trit-planes (inputs: packed plane 1, packed plane 2, scales)."""

    columns: int
    dtype: str
    elementwise = False

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        one, two, scales = inputs
        planes = (unpack_trits(one.to(torch.uint8), self.columns), unpack_trits(two.to(torch.uint8), self.columns))
        return TritPlanes(planes, scales.to(torch_dtype(self.dtype))).dense()

    def describe(self) -> str:
        return "dense weight of two trit-planes"
