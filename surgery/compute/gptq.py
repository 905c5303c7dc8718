"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): a matrix's columns are rounded one at a time, and each one's rounding error is spread
over the columns not yet rounded through the inverse Hessian of the layer's inputs, H = 2/n X X^T, so
the layer's output on those inputs moves as little as the grid allows. The updates run in blocks of
columns (the paper's lazy batch updates, section 3.4) on the upper Cholesky factor of H^-1.

The grid is RTN's (`compute.quantize.grid`: scales and zero points of the original weight's groups),
as llm-compressor does: activation order changes which columns go first but never the groups, so the
packed format needs no column permutation, and GPTQ differs from RTN only in which grid point each
weight takes. Everything runs in the weight's dtype (float32 here; float64 in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery.compute.quantize import Quantized, grid, rounded
from surgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GptqSettings:
    group_size: int
    symmetric: bool
    act_order: bool = False
    dampening: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128
    token_importance: str = "uniform"  # or "attention": RSQ's weighting of each token's input


class Hessian:
    """The running mean of 2 x x^T over every input row a linear layer sees (float32, on the rows' device);
    with `weights` (one per row, RSQ's token importance), 2 r x x^T with the weights of each call scaled to
    mean 1, as RSQ's code does, so the Hessian stays on the scale of the unweighted one."""

    def __init__(self, columns: int, device: torch.device | str) -> None:
        import torch

        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        if weights is not None:
            if weights.numel() != rows.shape[0]:
                raise SurgeryError(f"gptq: {weights.numel()} token weights for {rows.shape[0]} input rows; token "
                                   "importance needs a linear layer that sees each token once")
            rows = rows * (weights.reshape(-1, 1).to(rows) / weights.mean().to(rows)).sqrt()
        total = self.rows + rows.shape[0]
        self.matrix.mul_(self.rows / total).addmm_(rows.T, rows, alpha=2 / total)
        self.rows = total


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, settings: GptqSettings, dtype: torch.dtype
         ) -> Quantized:
    """GPTQ of a 2-D weight to `bits` on its inputs' Hessian; scales stored in `dtype`, as RTN stores them."""
    import torch

    s = settings
    columns = weight.shape[1]
    scale, zero = grid(weight, bits, s.group_size, s.symmetric, dtype)
    w = weight.clone()
    h = hessian.to(w.dtype).clone()
    dead = torch.diag(h) == 0  # an input that is always 0: its weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if s.act_order else \
        torch.arange(columns, device=w.device)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(s.dampening * torch.mean(torch.diag(h)))
    inverse = _upper_inverse_factor(h)
    group = order // s.group_size  # each column's group, in the order the columns are rounded
    column_scale, column_zero = scale[:, group].to(w.dtype), zero[:, group]
    values = torch.empty_like(w)
    for first in range(0, columns, s.block_size):
        last = min(first + s.block_size, columns)
        block = w[:, first:last].clone()
        errors = torch.empty_like(block)
        for i in range(last - first):
            column = first + i
            q = rounded(block[:, i], column_scale[:, column], column_zero[:, column], bits)
            values[:, column] = q
            error = (block[:, i] - (q - column_zero[:, column]) * column_scale[:, column]) / inverse[column, column]
            block[:, i:] -= error.unsqueeze(1) * inverse[column, first + i:last].unsqueeze(0)
            errors[:, i] = error
        w[:, last:] -= errors @ inverse[first:last, last:]
    original = torch.empty_like(values)
    original[:, order] = values
    return Quantized(original.to(torch.int8), scale, zero.to(torch.int8))


def output_error(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the mean squared change of the layer's output on its inputs, times 2."""
    delta = (weight - dense).double()
    return float(((delta @ hessian.double()) * delta).sum())


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, whose row i holds column i's updates of the columns after it."""
    import torch

    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise SurgeryError("gptq: the inputs' Hessian is not positive definite even after dampening; raise "
                           "quantizer.dampening (e.g. 0.1) or give more calibration samples") from None
