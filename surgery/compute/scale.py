"""Scaling a tensor by a constant, fused with whatever computes it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from surgery.recipe.tensor import Blocks

if TYPE_CHECKING:
    import torch

    from surgery.recipe.tensor import Compute


@dataclass(frozen=True)
class Scaled:
    """Multiply a tensor by a constant in float32 (the executor casts back to its dtype); with `inner`,
    the product of that compute, so no intermediate rounding happens between the two."""

    factor: float
    inner: Compute | None = None

    @property
    def elementwise(self) -> bool:
        return self.inner is None or self.inner.elementwise

    def prepare(self, blocks: Blocks) -> Scaled:
        return self if self.inner is None else replace(self, inner=self.inner.prepare(blocks))

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        tensor = inputs[0] if self.inner is None else self.inner(inputs)
        return tensor.mul_(self.factor)

    def describe(self) -> str:
        inner = "" if self.inner is None else f" after {self.inner.describe()}"
        return f"scale x{self.factor}{inner}"
