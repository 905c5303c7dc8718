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
from surgery.compute import fused
from surgery.compute.fused import KEEP_KINDS, SceSum, raw_blocks, sce_energies, top_variance_cut
from surgery.compute.select import Cut, top_cuts
from surgery.compute.updates import Update
from surgery.recipe.raw import RawBlocks
from surgery.recipe.tensor import Block, Blocks

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SceMerge(Update):
    """base + lam * SCE(task vectors), see the module docstring. The kernels (fused.py) make the same bits:
    every sum here runs left to right over the models, as theirs do."""

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
        raw = raw_blocks(blocks) if fused.sce is not None else None
        prepared = self._selection(blocks, raw)
        if raw is not None:  # no torch: a merge on a machine without a GPU never imports it
            keep, value, position = prepared._kernel_keep()
            energy = sce_energies(raw, keep, value, position)
        else:
            import torch

            energy = [0.0] * self.models
            for block in blocks():
                for t, tau in enumerate(prepared._selected(block)):
                    energy[t] += float(tau.mul(tau).sum(dtype=torch.float64))
        energy = [e / max(numel(self.shape), 1) for e in energy]
        total = sum(energy)
        weights = [1 / self.models] * self.models if abs(total) < 1e-6 else [e / total for e in energy]
        return replace(prepared, weights=tuple(weights))

    def __call__(self, inputs: Block) -> torch.Tensor:
        import torch

        assert self.weights is not None, "prepare() first"
        base = inputs[0].clone()
        taus = self._selected(inputs)
        positive = _summed(taus) >= 0
        mixed = total = None
        for weight, tau in zip(self.weights, taus, strict=True):
            agreed = (tau.sign() == torch.where(positive, 1.0, -1.0)).to(tau.dtype).mul_(weight)
            mixed = tau * agreed if mixed is None else mixed.add_(tau * agreed)
            total = agreed if total is None else total.add_(agreed)
        assert mixed is not None and total is not None
        merged = mixed.div_(total.clamp_(min=1e-6))
        if self.lam != 1.0:
            merged.mul_(self.lam)
        return merged.add_(base)

    def fused_pass(self) -> SceSum | None:
        if fused.sce is None or self.weights is None:
            return None
        return SceSum(*self._kernel_keep(), weights=self.weights, lam=self.lam)

    def scaled(self, factor: float) -> SceMerge:
        return replace(self, lam=self.lam * factor)

    def describe(self) -> str:
        return f"base + {self.lam:g}*sce(select_topk {self.select_topk:g}, {self.models} models)"

    def _selection(self, blocks: Blocks, raw: RawBlocks | None) -> SceMerge:
        """Which entries are kept: all, none, or the top select_topk of the nonzero variances (their cut found
        in two passes by the kernels where a sample brackets it, else in up to four by torch)."""
        if self.select_topk >= 1:
            return self
        if self.select_topk <= 0:
            return replace(self, keep_none=True)
        n = numel(self.shape)
        kept, found = top_variance_cut(raw, self.select_topk, n) if raw is not None else (None, None)
        if kept is None:
            kept = int(sum(int((_variance(_task_vectors(block)) != 0).sum()) for block in blocks()) * self.select_topk)
        if kept == 0:
            return replace(self, keep_none=True)
        if found is not None:
            return replace(self, cut=Cut(*found))
        return replace(self, cut=top_cuts(blocks, lambda block: iter([_variance(_task_vectors(block))]), [kept], n)[0])

    def _kernel_keep(self) -> tuple[int, float, int]:
        if self.keep_none:
            return KEEP_KINDS["none"], 0.0, 0
        if self.cut is None:
            return KEEP_KINDS["all"], 0.0, 0
        return KEEP_KINDS["top"], self.cut.value, self.cut.position

    def _selected(self, block: Block) -> list[torch.Tensor]:
        """The task vectors, zero outside the selected entries (the block's inputs are overwritten)."""
        taus = _task_vectors(block)
        if self.keep_none:
            return [tau.zero_() for tau in taus]
        if self.cut is None:
            return taus
        keep = self.cut.before(_variance(taus), block.start)
        return [tau.mul_(keep) for tau in taus]


def _task_vectors(block: Block) -> list[torch.Tensor]:
    base, *models = block
    return [model.sub_(base) for model in models]


def _summed(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total


def _variance(taus: list[torch.Tensor]) -> torch.Tensor:
    """The population variance over the models, entry by entry, its sums left to right (as the kernel's)."""
    mean = _summed(taus).div_(len(taus))
    var = None
    for tau in taus:
        deviation = tau - mean
        squared = deviation.mul_(deviation)
        var = squared if var is None else var.add_(squared)
    assert var is not None
    return var.div_(len(taus))
