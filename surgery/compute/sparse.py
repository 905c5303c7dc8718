"""The task-arithmetic family, block by block: trim each task vector, rescale it, weight it, elect signs,
combine, add to the base. `ties`, `dare_*`, `breadcrumbs*`, `della*` and `task_arithmetic` with options
are this one compute with different trims and defaults, as mergekit generalizes them.

Per model t: tau_t = model_t - base, kept where its trim says (magnitude: the k = max(1, floor(density
* numel)) largest |tau|, ties at the k-th split by position, lowest first; outliers: the band of
ascending ranks [n - k - floor(gamma * numel), n - floor(gamma * numel)); random: each entry with
probability density; della: probability density +- epsilon by the entry's rank of |tau| in its row),
optionally rescaled to its own L1 norm, times weight_t. With consensus, each entry's sign is the sign of
the sum (>= 0 is +) and only agreeing entries count; `normalize` divides by the summed weights of the
entries that count; lambda scales the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from surgery.checkpoint.reader import numel
from surgery.compute import fused
from surgery.compute.fused import (
    KEEP_KINDS,
    KernelTrim,
    TrimmedSum,
    kept_masks,
    l1_norms_of,
    rank_magnitude_cuts,
    raw_blocks,
    top_magnitude_cuts,
)
from surgery.compute.noise import noise_threshold, stream_key, uniform
from surgery.compute.select import Cut, rank_cuts, top_cuts
from surgery.compute.updates import Update
from surgery.recipe.tensor import Block, Blocks

if TYPE_CHECKING:
    import torch

Trim = Literal["magnitude", "outliers", "random", "della"]
RESCALE_EPS = 1e-7  # mergekit's: below it a norm is treated as zero and nothing is rescaled


@dataclass(frozen=True)
class ModelTrim:
    """One model's weight and trim settings, resolved for one tensor."""

    weight: float
    density: float = 1.0
    gamma: float = 0.0  # outliers: the fraction of largest entries dropped
    epsilon: float = 0.0  # della: the spread of keep probabilities around density


@dataclass(frozen=True)
class Keep:
    """A prepared trim for one model: `top` keeps the entries before it; `low`/`high` keep the band from
    `low` up to (not including) `high`; `all` keeps everything, `none` nothing."""

    kind: Literal["all", "none", "top", "band", "random", "della"]
    top: Cut | None = None
    low: Cut | None = None
    high: Cut | None = None


@dataclass(frozen=True)
class SparseMerge(Update):
    """base + lambda * combine(trim(model_t - base) * rescale_t * weight_t), see the module docstring."""

    models: tuple[ModelTrim, ...]
    shape: tuple[int, ...]
    trim: Trim | None = None
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    lam: float = 1.0
    seed: int = 0
    tensor: str = ""  # the random trims' stream: one per tensor and model
    keeps: tuple[Keep, ...] | None = None  # found by `prepare`
    scales: tuple[float, ...] = ()  # per model, the L1 rescale found by `prepare` (() when off)
    # della's masks from the L1 pass, as bits, for the merge pass (each row ranked once, not twice)
    packed_masks: bytearray | None = field(default=None, compare=False, repr=False)

    @property
    def whole_rows(self) -> bool:
        return self.trim == "della"

    @property
    def _row(self) -> int:
        """della ranks along the last dimension (the whole tensor for a vector)."""
        return self.shape[-1] if len(self.shape) > 1 else max(numel(self.shape), 1)

    def prepare(self, blocks: Blocks) -> SparseMerge:
        if self.keeps is not None:
            return self
        prepared = replace(self, keeps=self._keeps(blocks))
        if not (self.rescale and self.trim):
            return prepared
        raw, trims = raw_blocks(blocks), prepared._fused_trims()
        if raw is None or trims is None:
            norms, packed = prepared._l1_norms(blocks), None
        else:
            packed = kept_masks(trims, numel(self.shape))
            norms = l1_norms_of(raw, trims, packed)
        return replace(prepared, scales=tuple(1.0 if b < RESCALE_EPS or a < RESCALE_EPS else b / a for b, a in norms),
                       packed_masks=packed)

    def __call__(self, inputs: Block) -> torch.Tensor:
        import torch

        assert self.keeps is not None, "prepare() first"
        base, *models = inputs
        taus = []
        for t, (settings, model) in enumerate(zip(self.models, models, strict=True)):
            tau = self._trimmed(t, model.sub_(base), inputs.start)
            if self.scales and self.scales[t] != 1.0:
                tau.mul_(self.scales[t])
            taus.append(tau.mul_(settings.weight))
        deltas = torch.stack(taus)
        weights = torch.tensor([m.weight for m in self.models], device=base.device).view(-1, *[1] * base.dim())
        if self.consensus:
            agree = agreeing(deltas)
            mixed = (deltas * agree).sum(0)
            divisor = (weights * agree).sum(0)
            divisor[divisor == 0] = 1.0
        else:
            mixed = deltas.sum(0)
            total = sum(m.weight for m in self.models)
            divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, device=base.device)
        if self.normalize:
            mixed.div_(divisor)
        if self.lam != 1.0:
            mixed.mul_(self.lam)
        return mixed.add_(base)

    def scaled(self, factor: float) -> SparseMerge:
        return replace(self, lam=self.lam * factor)

    def fused_pass(self) -> TrimmedSum | None:
        """Once prepared, where the kernels are built."""
        trims = self._fused_trims()
        if trims is None:
            return None
        total = sum(m.weight for m in self.models)
        return TrimmedSum(trims, weights=tuple(m.weight for m in self.models),
                          scales=self.scales or tuple(1.0 for _ in self.models), consensus=self.consensus,
                          normalize=self.normalize, divisor=1.0 if abs(total) < 1e-8 else total, lam=self.lam,
                          packed=self.packed_masks)

    def _fused_trims(self) -> tuple[KernelTrim, ...] | None:
        """The prepared trims as the kernels take them; None where the kernels are not built."""
        if fused.ties is None or self.keeps is None or any(k.kind not in KEEP_KINDS for k in self.keeps):
            return None
        n = numel(self.shape)
        trims = []
        for t, keep in enumerate(self.keeps):
            kind = KEEP_KINDS[keep.kind]
            if keep.kind == "top" and keep.top is not None:
                trims.append(KernelTrim(kind, keep.top.value, keep.top.position))
            elif keep.kind == "band":  # no low cut: every magnitude is at or above 0; no high cut: none at n
                low = keep.low or Cut(0.0, 0)
                high = keep.high or Cut(float("inf"), n)
                trims.append(KernelTrim(kind, low.value, low.position, high.value, high.position))
            elif keep.kind == "random":
                trims.append(KernelTrim(kind, key=stream_key(self.seed, self.tensor, t),
                                        threshold=noise_threshold(self.models[t].density)))
            elif keep.kind == "della":
                settings = self.models[t]
                trims.append(KernelTrim(kind, key=stream_key(self.seed, self.tensor, t), row=self._row,
                                        spread=2 * settings.epsilon, offset=settings.density - settings.epsilon))
            else:
                trims.append(KernelTrim(kind))
        return tuple(trims)

    def describe(self) -> str:
        models = ", ".join(f"w {m.weight:g} d {m.density:g}" + (f" g {m.gamma:g}" if self.trim == "outliers" else "")
                           + (f" e {m.epsilon:g}" if self.trim == "della" else "") for m in self.models)
        options = [f"trim {self.trim}"] if self.trim else []
        options += [name for name in ("consensus", "normalize", "rescale") if getattr(self, name)]
        if self.trim in ("random", "della"):
            options.append(f"seed {self.seed}")
        return f"base + {self.lam:g}*merge({'; '.join(options)}; {models})"

    def _trimmed(self, t: int, tau: torch.Tensor, start: int) -> torch.Tensor:
        import torch

        assert self.keeps is not None
        keep = self.keeps[t]
        if keep.kind == "all":
            return tau
        if keep.kind == "none":
            return tau.zero_()
        if keep.kind == "top":
            assert keep.top is not None
            return tau.mul_(keep.top.before(tau.abs(), start))
        if keep.kind == "band":
            score = tau.abs()
            mask = torch.ones_like(score, dtype=torch.bool) if keep.low is None else keep.low.at_or_above(score, start)
            if keep.high is not None:
                mask &= ~keep.high.at_or_above(score, start)
            return tau.mul_(mask)
        noise = uniform(stream_key(self.seed, self.tensor, t), start, tau.numel(), tau.device)
        if keep.kind == "random":
            return tau.mul_(noise < self.models[t].density)
        return tau.mul_(noise < self._della_probabilities(t, tau))

    def _della_probabilities(self, t: int, tau: torch.Tensor) -> torch.Tensor:
        """density - epsilon + 2 * epsilon * (rank of |tau| in its row, ties by position) / (row - 1)."""
        import torch

        row = self._row
        rows = tau.abs().view(-1, row)
        order = torch.argsort(rows, dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(row, device=tau.device).expand_as(order))
        spread = ranks.float().div_(row - 1) if row > 1 else torch.zeros_like(rows)
        settings = self.models[t]
        return spread.mul_(2 * settings.epsilon).add_(settings.density - settings.epsilon).view(-1)

    def _keeps(self, blocks: Blocks) -> tuple[Keep, ...]:
        """Each model's trim, prepared: for magnitude and outliers, the exact cuts (fused: a sampled pass and a
        window pass where the sample brackets the cuts; otherwise up to three streaming passes)."""
        n = numel(self.shape)
        keeps = [_plain_keep(self.trim, m, n) for m in self.models]
        if all(keeps):
            return tuple(k for k in keeps if k is not None)
        raw = raw_blocks(blocks)
        if self.trim == "magnitude" and raw is not None:
            wanted = [None if keep else _top_count(m.density, n) for m, keep in zip(self.models, keeps, strict=True)]
            for t, found in enumerate(top_magnitude_cuts(raw, wanted, n)):
                keeps[t] = keeps[t] or Keep("top", top=Cut(*found) if found else None)
        elif self.trim == "magnitude":
            counts = [n if keep else _top_count(m.density, n) for m, keep in zip(self.models, keeps, strict=True)]
            for t, cut in enumerate(top_cuts(blocks, self._magnitudes, counts, n)):
                keeps[t] = keeps[t] or Keep("top", top=cut)
        else:
            bands = [_band(m, n) for m in self.models]
            ranks = [[] if keep else [r for r in band if 0 < r < n] for band, keep in zip(bands, keeps, strict=True)]
            found = rank_magnitude_cuts(raw, ranks, n) if raw is not None else None
            by_rank = ([[Cut(*cut) for cut in cuts] for cuts in found] if found is not None
                       else rank_cuts(blocks, self._magnitudes, ranks))
            for t, cuts in enumerate(by_rank):
                if keeps[t] is None:
                    low, high = bands[t]
                    keeps[t] = Keep("band", low=cuts.pop(0) if low > 0 else None,
                                    high=cuts.pop(0) if high < n else None)
        return tuple(k for k in keeps if k is not None)

    def _magnitudes(self, block: Block):  # type: ignore[no-untyped-def]
        base, *models = block
        for model in models:
            yield model.sub_(base).abs_()

    def _l1_norms(self, blocks: Blocks) -> list[tuple[float, float]]:
        """Per model, ||tau_t||_1 and ||trimmed tau_t||_1."""
        import torch

        before = [0.0] * len(self.models)
        after = [0.0] * len(self.models)
        for block in blocks():
            base, *models = block
            for t, model in enumerate(models):
                tau = model.sub_(base)
                before[t] += float(tau.abs().sum(dtype=torch.float64))
                after[t] += float(self._trimmed(t, tau, block.start).abs_().sum(dtype=torch.float64))
        return list(zip(before, after, strict=True))


def agreeing(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over stacked task vectors: each entry's sign is the sum's (>= 0 is +); True where
    a model's entry has it (a zero entry never does)."""
    import torch

    return deltas.sign() == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)


def _plain_keep(trim: Trim | None, model: ModelTrim, n: int) -> Keep | None:
    """The trims that need no order statistics; None where cuts must be found."""
    if trim is None or model.density >= 1 or n == 0:
        return Keep("all")
    if trim in ("random", "della"):
        return Keep("none") if model.density <= 0 else Keep(trim)
    if model.density <= 0:
        return Keep("none")
    if trim == "outliers":
        low, high = _band(model, n)
        if high <= low:
            return Keep("none")
        if low == 0 and high == n:
            return Keep("all")
    return None


def _top_count(density: float, n: int) -> int:
    return max(1, int(density * n))


def _band(model: ModelTrim, n: int) -> tuple[int, int]:
    """Outliers: the ascending ranks [low, high) kept (mergekit's magnitude_outliers)."""
    target = int(model.density * n)
    low = max(0, n - target - int(model.gamma * n))
    return low, low + target

