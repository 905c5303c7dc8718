"""RSQ's attention concentration (Sung et al. 2025, "RSQ: Learning from Important Tokens Leads to Better
Quantized LLMs"): a token matters as much as the attention a layer's heads give it, summed over heads and
over the positions attending to it, then scaled per row to [FLOOR, CEILING] (min-max, the settings of the
paper's own run script: 0.005 and 1). GPTQ's Hessian then weighs each token's input by its importance
(compute.gptq.Hessian.add).

The attention probabilities are the layer's own, on the inputs the quantized layers before it make; they
need transformers' eager attention, which the calibration switches to. A layer without attention (a
Mamba layer of a hybrid) weighs every token alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FLOOR, CEILING = 0.005, 1.0


def concentration(probabilities: torch.Tensor) -> torch.Tensor:
    """Per key position, the attention it receives (batch 1, any heads), min-max scaled to [FLOOR, CEILING]."""
    received = probabilities.double().sum(dim=(0, 1, 2))
    spread = received.max() - received.min()
    if spread == 0:
        return received.new_full(received.shape, CEILING)
    return FLOOR + (received - received.min()) / spread * (CEILING - FLOOR)


@contextmanager
def attention_of(layer: Any) -> Iterator[list[torch.Tensor]]:
    """While inside, the attention probabilities (batch, heads, queries, keys) each attention module of the
    layer returns, in the order they run."""
    import torch

    seen: list[torch.Tensor] = []

    def keep(module: Any, args: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor) \
                and output[1].dim() == 4:
            seen.append(output[1].detach())

    handles = [m.register_forward_hook(keep) for m in layer.modules() if type(m).__name__.endswith("Attention")]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def layer_importance(inputs: Any, index: int, layer: Any) -> list[torch.Tensor] | None:
    """Each calibration row's token importance at layer `index` (the mean over its attention modules), or
    None where the layer has no attention."""
    rows: list[torch.Tensor] = []
    for row in range(len(inputs.hidden)):
        with attention_of(layer) as seen:
            inputs.run_row(index, layer, row)
        if not seen:
            return None
        rows.append(sum(concentration(p) for p in seen) / len(seen))
    return rows
