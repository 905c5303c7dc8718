"""An orthogonal rotation of the residual stream folded into the weights (QuaRot, Ashkboos et al. 2024;
the rotation RSQ applies before it quantizes): with h' = h Q for a random orthogonal Q, every matrix that
reads the residual becomes W Q, every one that writes it Q^T W, and the embedding E Q; RMSNorm commutes
with Q once its scale is folded into the matrices it feeds, so the model computes exactly what it did,
while outlier features are spread over all dimensions (which is what rounding gains from).

Q is the orthogonal factor of a seeded Gaussian matrix's QR decomposition (float64), signs fixed so it
is unique; every tensor's compute rebuilds it from (size, seed), so a tensor streams on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from surgery.recipe.tensor import Unprepared

if TYPE_CHECKING:
    import torch

Side = Literal["reads", "writes", "vector"]  # W -> W diag(g) Q, W -> Q^T W, b -> b Q


@lru_cache(maxsize=4)
def rotation(size: int, seed: int) -> torch.Tensor:
    import torch

    gaussian = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass(frozen=True)
class Rotate(Unprepared):
    """One tensor of the rotated model. `reads`: inputs (W, and the norm scale g folded into it when
    given), W diag(g) Q; `writes`: Q^T W (W's rows are the residual); `vector`: a bias added to the
    residual, b Q. Computed in float64."""

    side: Side
    size: int
    seed: int
    elementwise = False

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        q = rotation(self.size, self.seed).to(inputs[0].device)
        weight = inputs[0].double()
        if self.side == "writes":
            return q.T @ weight
        if self.side == "vector":
            return weight @ q
        if len(inputs) > 1:
            weight = weight * inputs[1].double()
        return weight @ q

    def describe(self) -> str:
        folded = {"reads": "x diag(norm) Q", "writes": "Q^T x", "vector": "x Q"}[self.side]
        return f"rotated {folded} (random orthogonal Q of size {self.size}, seed {self.seed})"


@dataclass(frozen=True)
class Ones(Unprepared):
    """A norm's scale once folded into the matrices after it."""

    elementwise = True

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.ones_like(inputs[0])

    def describe(self) -> str:
        return "ones (the scale folded into the next matrices)"
