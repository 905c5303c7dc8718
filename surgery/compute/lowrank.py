"""The tensor functions of layer tying: a shared weight made from tied layers, and per-depth low-rank
corrections of it (Relaxed Recursive Transformers, Bae et al. 2024).

The shared weight is the mean of its source layers, rounded to the stored dtype. A depth's
correction comes from the truncated SVD of its residual, R = W_l - W_shared ~ (U_r S_r)(V_r^T) = B A.
Every function here rounds B and A to the stored dtype before using them, so the three forms of
one plan agree:
- the compact factors;
- the materialized weight, shared + B A;
- the weight a compact checkpoint materializes to later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from surgery.checkpoint.blocks import torch_dtype
from surgery.recipe.tensor import Unprepared

if TYPE_CHECKING:
    import torch

Factor = Literal["B", "A"]


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum in order, then divide: one definition, so blocks and whole tensors round alike."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total.add_(tensor)
    return total.div_(len(tensors)) if len(tensors) > 1 else total


def rounded(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 value of `tensor` after a round trip through the stored dtype."""
    return tensor.to(torch_dtype(dtype)).float()


@dataclass(frozen=True)
class Mean(Unprepared):
    """The shared weight: the mean of the tied layers' tensors (a copy when there is one)."""

    elementwise = True


    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return mean_of(inputs)

    def describe(self) -> str:
        return "mean"


@dataclass
class SvdCache:
    """One depth and tensor's factors, shared by its B and A recipes (adjacent in write order) so
    the pair costs one decomposition."""

    factors: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class ResidualFactors(Unprepared):
    """Inputs: the depth's own tensor, then the tied layers the shared one is the mean of.
    Outputs one factor of the rank-r truncated SVD of the residual: B = U_r S_r, or A = V_r^T."""

    rank: int
    dtype: str  # the stored dtype of the shared weight and the factors
    factor: Factor | None = None  # None: the relaxed weight itself, shared + B A
    cache: SvdCache = field(default_factory=SvdCache, compare=False, repr=False)
    elementwise = False


    def factors(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shared, B, A), each rounded to the stored dtype, in float32."""
        import torch

        own, tied = inputs[0], inputs[1:]
        shared = rounded(mean_of(tied), self.dtype)
        factors = self.cache.factors
        if factors is None:
            u, s, vh = torch.linalg.svd(own - shared, full_matrices=False)
            factors = (rounded(u[:, : self.rank] * s[: self.rank], self.dtype), rounded(vh[: self.rank], self.dtype))
            if self.factor == "B":
                self.cache.factors = factors  # for the A that follows
        return shared, *factors

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        shared, b, a = self.factors(inputs)
        if self.factor == "B":
            return b
        if self.factor == "A":
            self.cache.factors = None  # this pair is done
            return a
        return low_rank_sum(shared, b, a)

    def describe(self) -> str:
        what = "relaxed weight" if self.factor is None else f"LoRA {self.factor}"
        return f"{what} (rank {self.rank} SVD of the residual to the mean of inputs 2..)"


def low_rank_sum(shared: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """shared + B A, in float32."""
    return shared.addmm_(b, a)


@dataclass(frozen=True)
class LowRankSum(Unprepared):
    """Inputs: shared, B, A as stored in a compact checkpoint; output shared + B A."""

    elementwise = False


    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        shared, b, a = inputs
        return low_rank_sum(shared, b, a)

    def describe(self) -> str:
        return "shared + B A"
