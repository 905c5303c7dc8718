"""SCE (Wan et al. 2024, FuseChat): Select the entries where the task vectors vary most, Calculate each
model's weight from its selected task vector's energy, Erase entries whose sign disagrees, then average.

Per tensor: var_e = the variance over models of tau_t[e] (population); keep the k = floor(select_topk *
count(var != 0)) entries of largest variance (ties by lowest position); w_t = mean(tau_t^2) over the
kept entries' tensor, normalized to sum 1 (equal where the sum is below 1e-6); each entry's sign is that
of sum_t tau_t (>= 0 is +); merged = sum_t w_t tau_t [agrees] / max(sum_t w_t [agrees], 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from surgery.checkpoint.reader import numel
from surgery.compute.select import Cut, top_cuts
from surgery.compute.sparse import agreeing
from surgery.compute.updates import Update
from surgery.recipe.tensor import Block, Blocks

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SceMerge(Update):
    """base + lam * SCE(task vectors), see the module docstring."""

    models: int
    shape: tuple[int, ...]
    select_topk: float = 1.0
    lam: float = 1.0  # 1 in SCE; LiNeS scales it
    cut: Cut | None = None  # the variance cut found by `prepare` (None: keep all, or none when `keep_none`)
    keep_none: bool = False
    weights: tuple[float, ...] | None = None

    def prepare(self, blocks: Blocks) -> SceMerge:
        if self.weights is not None:
            return self
        prepared = self
        if self.select_topk <= 0:
            prepared = replace(self, keep_none=True)
        elif self.select_topk < 1:
            varying = sum(int((_variance(block) != 0).sum()) for block in blocks())
            kept = int(varying * self.select_topk)
            if kept == 0:
                prepared = replace(self, keep_none=True)
            else:
                n = numel(self.shape)
                cut = top_cuts(blocks, lambda block: iter([_variance(block)]), [kept], n)[0]
                prepared = replace(self, cut=cut)
        import torch

        energy = [0.0] * self.models
        for block in blocks():
            for t, tau in enumerate(prepared._selected(block)):
                energy[t] += float(tau.square().sum(dtype=torch.float64))
        energy = [e / max(numel(self.shape), 1) for e in energy]
        total = sum(energy)
        weights = [1 / self.models] * self.models if abs(total) < 1e-6 else [e / total for e in energy]
        return replace(prepared, weights=tuple(weights))

    def __call__(self, inputs: Block) -> torch.Tensor:
        import torch

        assert self.weights is not None, "prepare() first"
        base = inputs[0].clone()
        taus = torch.stack(self._selected(inputs))
        weights = torch.tensor(self.weights, device=base.device).view(-1, *[1] * base.dim()) * agreeing(taus)
        merged = (taus * weights).sum(0).div_(weights.sum(0).clamp(min=1e-6))
        if self.lam != 1.0:
            merged.mul_(self.lam)
        return merged.add_(base)

    def scaled(self, factor: float) -> SceMerge:
        return replace(self, lam=self.lam * factor)

    def describe(self) -> str:
        return f"base + {self.lam:g}*sce(select_topk {self.select_topk:g}, {self.models} models)"

    def _selected(self, block: Block) -> list[torch.Tensor]:
        """The task vectors, zero outside the selected entries (the block's inputs are overwritten)."""
        base, *models = block
        taus = [model.sub_(base) for model in models]
        if self.keep_none:
            return [tau.zero_() for tau in taus]
        if self.cut is None:
            return taus
        import torch

        keep = self.cut.before(torch.stack(taus).var(0, correction=0), block.start)
        return [tau.mul_(keep) for tau in taus]


def _variance(block: Block) -> torch.Tensor:
    import torch

    base, *models = block
    return torch.stack([model.sub_(base) for model in models]).var(0, correction=0)

