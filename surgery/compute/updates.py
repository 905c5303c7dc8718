"""Computes that add a combination of task vectors to a base tensor, block by block.

Inputs are always the base tensor, then one tensor per fine-tuned model, as float32 blocks; a task
vector is `model - base`. Every compute here is elementwise (TIES needs per-tensor magnitude
thresholds first, found in `prepare` by streaming the blocks), and `scaled(s)` multiplies the whole
update, so LiNeS composes with any merge without losing precision to an intermediate cast.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from surgery.recipe.tensor import Blocks, Unprepared

if TYPE_CHECKING:
    import torch


class Update(Unprepared):
    """base + (an update made of the task vectors)."""

    elementwise = True

    def scaled(self, factor: float) -> Update:
        raise NotImplementedError


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

    def describe(self) -> str:
        return "base + " + " + ".join(f"{w:g}*tau{i}" for i, w in enumerate(self.weights))


@dataclass(frozen=True)
class TiesUpdate(Update):
    """TIES-merging (Yadav et al. 2023), with per-model weights as mergekit applies them:
    trim each task vector to the entries whose magnitude is at least its k-th largest (k = floor(density
    * numel); ties at the threshold are kept), weight it, elect each entry's sign from the sum (>= 0 is
    +), average the weighted entries that agree with it (weights as the divisor), add lambda times that."""

    weights: tuple[float, ...]
    density: float
    lam: float = 1.0
    thresholds: tuple[float, ...] | None = None  # per model, found by `prepare`; () keeps everything

    def prepare(self, blocks: Blocks) -> TiesUpdate:
        if self.thresholds is not None:
            return self
        return replace(self, thresholds=magnitude_thresholds(blocks, self.density))

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        assert self.thresholds is not None, "prepare() first"
        base, *models = inputs
        weighted = []
        for t, (weight, model) in enumerate(zip(self.weights, models, strict=True)):
            tau = model.sub_(base)
            if self.thresholds:
                tau.mul_(tau.abs() >= self.thresholds[t])
            weighted.append(tau.mul_(weight))
        total = torch.stack(weighted)
        sign = torch.where(total.sum(0) >= 0, 1.0, -1.0)
        agree = total.sign() == sign
        numerator = (total * agree).sum(0)
        divisor = (torch.tensor(self.weights, device=base.device).view(-1, *[1] * base.dim()) * agree).sum(0)
        divisor[divisor == 0] = 1.0
        return numerator.div_(divisor).mul_(self.lam).add_(base)

    def scaled(self, factor: float) -> TiesUpdate:
        return replace(self, lam=self.lam * factor)

    def describe(self) -> str:
        weights = ", ".join(f"{w:g}" for w in self.weights)
        return f"base + {self.lam:g}*ties(density {self.density:g}, weights {weights})"


def magnitude_thresholds(blocks: Blocks, density: float) -> tuple[float, ...]:
    """Per model, the k-th largest |model - base| over the whole tensor, k = floor(density * numel);
    () at density 1 (nothing is trimmed). Found exactly in two streaming passes, a radix select on the
    float32 bit patterns (for values >= 0 they order like integers), so any tensor needs one block of memory."""
    import torch

    if density >= 1:
        return ()  # keep everything: no threshold

    def magnitude_bits(inputs: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        base = inputs[0]
        for model in inputs[1:]:
            yield model.sub_(base).abs_().view(torch.int32)

    high: list[torch.Tensor] = []
    for inputs in blocks():
        for t, bits in enumerate(magnitude_bits(inputs)):
            counts = torch.bincount(bits >> 16, minlength=1 << 16)
            if t < len(high):
                high[t] += counts
            else:
                high.append(counts)
    keep = int(density * int(high[0].sum())) if high else 0
    if keep == 0:
        return (float("inf"),) * len(high)
    prefixes, needs = [], []
    for counts in high:
        prefix, above = _kth_from_top(counts, keep)
        prefixes.append(prefix)
        needs.append(keep - above)
    low = [torch.zeros_like(counts) for counts in high]
    for inputs in blocks():
        for t, bits in enumerate(magnitude_bits(inputs)):
            low[t] += torch.bincount(bits[(bits >> 16) == prefixes[t]] & 0xFFFF, minlength=1 << 16)
    thresholds = []
    for t in range(len(high)):
        suffix, _ = _kth_from_top(low[t], needs[t])
        pattern = torch.tensor([(prefixes[t] << 16) | suffix], dtype=torch.int64).to(torch.int32)
        thresholds.append(float(pattern.view(torch.float32)))
    return tuple(thresholds)


def _kth_from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value (1-based), and how many values lie in bins above it."""
    from_top = counts.flip(0).cumsum(0)
    position = int((from_top >= k).nonzero()[0])
    bin_index = len(counts) - 1 - position
    return bin_index, int(from_top[position] - counts[bin_index])
