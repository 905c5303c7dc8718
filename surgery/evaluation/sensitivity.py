"""What lowering one layer to one width costs, measured: the mean KL divergence from the unquantized
model's next-token distribution when only that layer's matrices are rounded to that width, on the
calibration rows. `bits` with `score: kl` assigns widths from these costs.

Every probe is the whole model's forward (exact for any architecture: final norms, soft-capping, tied
heads), the reference's log-probabilities computed once per row and kept for that row only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from surgery.evaluation.agreement import kl_sum, log_probs

if TYPE_CHECKING:
    import torch

    from surgery.evaluation.parameters import ParameterSlot

Round = Callable[[str, "torch.Tensor", int], "torch.Tensor"]  # (name, weight, width) -> the rounded weight


def layer_costs(model: Any, matrices: list[dict[str, ParameterSlot]], widths: list[int], rounded: Round,
                rows: torch.Tensor) -> dict[int, list[float]]:
    """KL(unquantized || only layer l at width w) in nats per token, for every width and layer l whose
    `matrices` (its parameters by name, rounded where they wait and restored) are not empty; 0 for a
    layer with nothing to quantize."""
    import torch

    sums = {w: [0.0] * len(matrices) for w in widths}
    tokens = 0
    with torch.inference_mode():
        for row in rows:
            reference = log_probs(model, row)
            for layer, params in enumerate(matrices):
                if not params:
                    continue
                originals = {name: slot.read().clone() for name, slot in params.items()}
                for width in widths:
                    for name, slot in params.items():
                        slot.write(rounded(name, originals[name], width))
                    sums[width][layer] += kl_sum(reference, log_probs(model, row))
                for slot in params.values():
                    slot.reset()
            tokens += reference.shape[0]
    return {w: [s / tokens for s in per_layer] for w, per_layer in sums.items()}
