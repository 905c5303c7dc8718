"""Merges whose output is a combination of the inputs with coefficients from their inner products:
linear, slerp, nuslerp, multislerp, karcher, model_stock.

Each method's output lies in the span of its input vectors (the models, or their task vectors when a
base centres them), so it is sum_i c_i v_i with coefficients found from the inputs' Gram matrix
G_ij = <v_i, v_j>. `prepare` streams the tensor once to build G (per tensor, per row, or per column),
solves for c in float64 (mergekit's formulas, with its thresholds), and each block is then a weighted
sum: memory is a block, never a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from surgery.checkpoint.reader import numel
from surgery.compute import fused
from surgery.compute.fused import WeightedSum
from surgery.compute.updates import Update
from surgery.errors import SurgeryError
from surgery.recipe.tensor import Block, Blocks

if TYPE_CHECKING:
    import torch

Method = Literal["linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock"]
Grouping = Literal["tensor", "rows", "columns"]  # one statistic per tensor, per row (last dim), per dim-0 vector


@dataclass(frozen=True)
class SphereMerge(Update):
    """[base +] sum_i c_i v_i, v_i = model_i [- base]; with `factor`, base + factor * (that - base) (LiNeS)."""

    method: Method
    shape: tuple[int, ...]
    weights: tuple[float, ...]  # per model (slerp: (1 - t, t))
    has_base: bool = False  # inputs[0] is the plan's base
    centered: bool = False  # the vectors are task vectors (model - base)
    grouping: Grouping = "tensor"
    normalize: bool = True  # linear's and multislerp's: divide the weights by their sum
    max_iter: int = 10  # karcher
    tol: float = 1e-5  # karcher
    factor: float = 1.0
    coefficients: tuple[tuple[float, ...], ...] | None = field(default=None, repr=False)  # [group][model], by prepare

    def prepare(self, blocks: Blocks) -> SphereMerge:
        if self.coefficients is not None:
            return self
        if self.method == "linear":  # sum w_i x_i, then divided by sum w_i (mergekit's order of rounding)
            return replace(self, coefficients=(self.weights,))
        grams = self._grams(blocks)
        solve = {"slerp": self._slerp, "nuslerp": self._nuslerp, "multislerp": self._multislerp,
                 "karcher": self._karcher, "model_stock": self._model_stock}[self.method]
        return replace(self, coefficients=tuple(tuple(solve(g)) for g in grams))

    def __call__(self, inputs: Block) -> torch.Tensor:
        import torch

        assert self.coefficients is not None, "prepare() first"
        base = inputs[0].clone() if self.has_base else None
        vectors = list(inputs[1:] if self.has_base else inputs)
        if self.centered:
            assert base is not None
            vectors = [v.sub_(base) for v in vectors]
        if len(self.coefficients) == 1:
            out = torch.zeros_like(vectors[0])
            for c, v in zip(self.coefficients[0], vectors, strict=True):
                out.add_(v.mul_(c))
        else:
            device = vectors[0].device
            per_entry = self._table.to(device)[self._groups(inputs.start, vectors[0].numel(), device)]
            out = (torch.stack(vectors, dim=1) * per_entry).sum(1)
        if self.method == "linear" and self.normalize:
            out.div_(sum(self.weights))
        if self.centered:
            assert base is not None
            out.add_(base)
        if self.factor != 1.0:
            assert base is not None, "scaling an update needs the base as the first input"
            out.sub_(base).mul_(self.factor).add_(base)
        return out

    @cached_property
    def _table(self) -> torch.Tensor:
        """The coefficients as a [group, model] tensor, made once per tensor rather than once per block."""
        import torch

        assert self.coefficients is not None
        return torch.tensor(self.coefficients, dtype=torch.float32)

    def scaled(self, factor: float) -> SphereMerge:
        return replace(self, factor=self.factor * factor)

    def fused_pass(self) -> WeightedSum | None:
        """Once prepared with one set of coefficients for the whole tensor (per-row or per-column ones
        vary within a block)."""
        if fused.combine is None or self.coefficients is None or len(self.coefficients) != 1:
            return None
        divisor = sum(self.weights) if self.method == "linear" and self.normalize else 0.0
        return WeightedSum(self.coefficients[0], self.has_base, self.centered, zero_start=True, divisor=divisor,
                           factor=self.factor)

    def describe(self) -> str:
        weights = ", ".join(f"{w:g}" for w in self.weights)
        centre = " of task vectors" if self.centered else ""
        scale = f", x{self.factor:g} from base" if self.factor != 1.0 else ""
        return f"{self.method}{centre}({weights}; per {self.grouping}{scale})"

    # --- statistics ---------------------------------------------------------------------------------

    def _groups(self, start: int, count: int, device: torch.device) -> torch.Tensor:
        import torch

        positions = torch.arange(start, start + count, device=device)
        if self.grouping == "rows":
            return positions // (self.shape[-1] if self.shape else 1)
        return positions % max(numel(self.shape) // (self.shape[0] if self.shape else 1), 1)

    def _group_count(self) -> int:
        if self.grouping == "tensor" or len(self.shape) < 2:
            return 1
        if self.grouping == "rows":
            return numel(self.shape) // self.shape[-1]
        return numel(self.shape) // self.shape[0]

    def _grams(self, blocks: Blocks) -> list[list[list[float]]]:
        """G per group, accumulated in float64 over the streamed blocks."""
        import torch

        groups = self._group_count()
        total = None
        for block in blocks():
            base = block[0] if self.has_base else None
            vectors = list(block[1:] if self.has_base else block)
            if self.centered:
                assert base is not None
                vectors = [v.sub_(base) for v in vectors]
            stacked = torch.stack(vectors).double()
            if total is None:
                total = torch.zeros(groups, len(vectors), len(vectors), dtype=torch.float64, device=stacked.device)
            if groups == 1:
                total[0] += stacked @ stacked.T
            else:
                products = stacked.unsqueeze(0) * stacked.unsqueeze(1)  # [n, n, entries]
                index = self._groups(block.start, stacked.shape[1], stacked.device)
                total.index_add_(0, index, products.permute(2, 0, 1))
        assert total is not None
        return total.cpu().tolist()

    # --- coefficients, one group's Gram matrix in, one coefficient per vector out --------------------

    def _slerp(self, gram: list[list[float]]) -> list[float]:
        """mergekit's slerp: the angle between the two tensors; nearly parallel (|cos| > 0.9995) is linear."""
        t = self.weights[1]
        norm_a, norm_b = (math.sqrt(gram[i][i]) for i in (0, 1))
        norm_a, norm_b = (n if n > 1e-8 else 1.0 for n in (norm_a, norm_b))
        dot = max(-1.0, min(1.0, gram[0][1] / (norm_a * norm_b)))
        if abs(dot) > 0.9995:
            return [1 - t, t]
        theta = math.acos(dot)
        return [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]

    def _nuslerp(self, gram: list[list[float]]) -> list[float]:
        """mergekit's nuslerp: t = w1 / (w0 + w1); colinear where 1 - cos^2 <= 1e-16."""
        total = sum(self.weights)
        t = 0.5 if abs(total) < 1e-6 else self.weights[1] / total
        norms = [max(math.sqrt(gram[i][i]), 1e-7) for i in (0, 1)]
        cos = max(-1.0, min(1.0, gram[0][1] / (norms[0] * norms[1])))
        if 1 - cos * cos <= 1e-16:
            return [1 - t, t]
        theta = math.acos(cos)
        return [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]

    def _multislerp(self, gram: list[list[float]]) -> list[float]:
        """mergekit's multislerp: project to the tangent space at the weighted mean direction, average there,
        map back, scale by the weighted mean norm."""
        n, eps = len(self.weights), 1e-8
        weights = _linear(self.weights, self.normalize)
        if n == 1:
            return [1.0]
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
        units = [1 / (norm + eps) for norm in norms]  # u_i = units[i] * v_i
        mean = [w * u for w, u in zip(weights, units, strict=True)]
        mean_norm = math.sqrt(max(_quad(gram, mean), 0.0))
        if mean_norm < eps:
            if n == 2:
                return list(weights)
            raise SurgeryError("multislerp: the weighted directions of the models cancel out (antipodal models "
                               "with balancing weights); change the weights")
        mean = [m / mean_norm for m in mean]
        projected = _apply(gram, mean)
        dots = [units[i] * projected[i] for i in range(n)]
        tangent = [sum(weights[i] * ((units[i] if i == j else 0.0) - dots[i] * mean[j]) for i in range(n))
                   for j in range(n)]
        tangent_norm = math.sqrt(max(_quad(gram, tangent), 0.0)) + eps
        scale = sum(w * norm for w, norm in zip(weights, norms, strict=True))
        return [scale * (m * math.cos(tangent_norm) + tg * math.sin(tangent_norm) / tangent_norm)
                for m, tg in zip(mean, tangent, strict=True)]

    def _karcher(self, gram: list[list[float]]) -> list[float]:
        """mergekit's karcher: the weighted Riemannian mean of the directions (fixed-point iterations),
        scaled by the weighted mean norm."""
        n, tol = len(self.weights), self.tol
        if n == 1:
            return [1.0]
        alphas = _linear(self.weights, True)
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
        valid = [i for i in range(n) if norms[i] > tol]
        scale = sum(a * norm for a, norm in zip(alphas, norms, strict=True))
        if not valid:
            return [0.0] * n
        total = sum(alphas[i] for i in valid)
        share = {i: alphas[i] / total for i in valid}
        unit = [[(1 / norms[i] if i == j else 0.0) for j in range(n)] for i in range(n)]  # u_i in v coordinates
        mean = [sum(share[i] * unit[i][j] for i in valid) for j in range(n)]
        mean_norm = math.sqrt(max(_quad(gram, mean), 0.0))
        mean = list(unit[valid[0]]) if mean_norm < tol else [m / mean_norm for m in mean]
        for _ in range(self.max_iter):
            tangent = [0.0] * n
            for i in valid:
                dot = max(-1.0, min(1.0, _dot(gram, mean, unit[i])))
                theta = math.acos(dot)
                if theta < tol:
                    continue
                step = share[i] * theta / math.sin(theta)
                tangent = [tg + step * (u - dot * m) for tg, u, m in zip(tangent, unit[i], mean, strict=True)]
            tangent_norm = math.sqrt(max(_quad(gram, tangent), 0.0))
            if tangent_norm < tol:
                break
            mean = [math.cos(tangent_norm) * m + math.sin(tangent_norm) * tg / tangent_norm
                    for m, tg in zip(mean, tangent, strict=True)]
            unit_norm = math.sqrt(max(_quad(gram, mean), 0.0))
            if unit_norm > tol:
                mean = [m / unit_norm for m in mean]
        return [scale * m for m in mean]

    def _model_stock(self, gram: list[list[float]]) -> list[float]:
        """Model Stock (Jang et al. 2024): t = N cos / (1 + (N - 1) cos) from the task vectors' mean pairwise
        cosine; base + t * (mean task vector); the base alone where the denominator vanishes."""
        n = len(self.weights)
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
        cosines = [max(-1.0, min(1.0, gram[i][j] / max(norms[i] * norms[j], 1e-6)))
                   for i in range(n) for j in range(i + 1, n)]
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (n - 1) * cos
        t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
        return [t / n] * n


def _linear(weights: tuple[float, ...], normalize: bool) -> list[float]:
    total = sum(weights)
    if not normalize:
        return list(weights)
    if total == 0:
        raise SurgeryError("the weights sum to zero, so they cannot be normalized; set normalize: false or change them")
    return [w / total for w in weights]


def _apply(gram: list[list[float]], x: list[float]) -> list[float]:
    return [sum(row[j] * x[j] for j in range(len(x))) for row in gram]


def _dot(gram: list[list[float]], x: list[float], y: list[float]) -> float:
    return sum(xi * gi for xi, gi in zip(x, _apply(gram, y), strict=True))


def _quad(gram: list[list[float]], x: list[float]) -> float:
    return _dot(gram, x, x)
