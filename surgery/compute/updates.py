"""Computes that add a combination of task vectors to a base tensor, block by block.

Inputs are always the base tensor, then one tensor per fine-tuned model, as float32 blocks; a task
vector is `model - base`. Every merge is an `Update`: elementwise over blocks (whole-tensor statistics,
TIES' thresholds or slerp's angles, are found first in `prepare` by streaming them), and `scaled(s)`
multiplies the whole update, so LiNeS composes with any merge without losing precision to an
intermediate cast. The other merges live beside this one: sparse.py, sphere.py, sce.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery.compute import fused
from surgery.compute.fused import WeightedSum
from surgery.recipe.raw import FusedPass
from surgery.recipe.tensor import Unprepared

if TYPE_CHECKING:
    import torch


class Update(Unprepared):
    """base + (an update made of the task vectors)."""

    elementwise = True

    def scaled(self, factor: float) -> Update:
        raise NotImplementedError

    def fused_pass(self) -> FusedPass | None:
        """The same update as one of the fused passes (compute/fused.py), once prepared; None where it is none."""
        return None


@dataclass(frozen=True)
class WeightedUpdate(Update):
    """Task arithmetic (and aTLAS, with per-block weights): base + sum_t w_t (model_t - base)."""

    weights: tuple[float, ...]

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        base, *models = inputs
        total = None
        for weight, model in zip(self.weights, models, strict=True):
            term = model.sub_(base).mul_(weight)  # no fused multiply-add: the same rounding as the formula
            total = term if total is None else total.add_(term)
        assert total is not None
        return total.add_(base)

    def scaled(self, factor: float) -> WeightedUpdate:
        return WeightedUpdate(tuple(w * factor for w in self.weights))

    def fused_pass(self) -> WeightedSum | None:
        if fused.combine is None:
            return None
        return WeightedSum(self.weights, has_base=True, centered=True, zero_start=False)

    def describe(self) -> str:
        return "base + " + " + ".join(f"{w:g}*tau{i}" for i, w in enumerate(self.weights))
