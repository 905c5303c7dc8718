"""Per-layer importance scores and the hooks that measure layers, shared by the `bits` op and `surgery analyze`.

- LIM (Dumitru et al. 2024): -cos(layer input, layer output), averaged over calibration tokens.
  Higher means the layer changes its input more, so it matters more.
- BI (ShortGPT): 1 - cos(h_in, h_out). It ranks layers the same way as LIM (BI = 1 + LIM).
- ZD: per weight matrix, the fraction of weights with |z| > 1, where z = (w - mean) / std over the
  matrix, averaged over the layer's matrices. Needs no data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError
from surgery.evaluation.data import first_tokens
from surgery.evaluation.models import input_device
from surgery.recipe.stream import RecipeStreamer
from surgery.recipe.view import ModelView

if TYPE_CHECKING:
    import torch


LayerHook = Callable[[int, "torch.Tensor", "torch.Tensor"], None]


@contextmanager
def watching_layers(layers: Any, on_layer: LayerHook) -> Iterator[None]:
    """While inside, every forward of layer i calls on_layer(i, hidden state entering it, leaving it)."""

    def hook(index: int) -> Any:
        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            entering = args[0] if args else kwargs["hidden_states"]
            on_layer(index, entering, output[0] if isinstance(output, tuple) else output)
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_rows(model: Any, rows: torch.Tensor) -> Iterator[torch.Tensor]:
    """Run each row through the model alone, cache off; yield it once its forward is done."""
    import torch

    device = input_device(model)
    with torch.inference_mode():
        for row in rows:
            model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            yield row


def layer_cosines(model: Any, layers: Any, batches: torch.Tensor) -> list[float]:
    """Mean over tokens of cos(hidden state entering layer i, hidden state leaving it)."""
    import torch

    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def record(index: int, entering: torch.Tensor, leaving: torch.Tensor) -> None:
        cosine = torch.nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
        sums[index] += float(cosine.sum())
        counts[index] += cosine.numel()

    with watching_layers(layers, record):
        for _ in forward_rows(model, batches):
            pass
    return [s / c for s, c in zip(sums, counts)]


def lim(cosines: list[float]) -> list[float]:
    return [-c for c in cosines]


def block_influence(cosines: list[float]) -> list[float]:
    return [1 - c for c in cosines]


def outlier_fraction(weight: torch.Tensor) -> float:
    """Fraction of a matrix's weights more than one standard deviation from its mean (float64 moments)."""
    values = weight.double().flatten()
    std = values.std()
    return 0.0 if std == 0 else float(((values - values.mean()).abs() > std).double().mean())


def zero_deviation(matrices: list[torch.Tensor]) -> float:
    """ZD of a layer: the mean over its matrices of their outlier fractions."""
    return sum(outlier_fraction(w) for w in matrices) / len(matrices)


def zero_deviations(view: ModelView) -> list[float]:
    """ZD of every layer of a view, each matrix read through its recipe."""
    streamer = RecipeStreamer()
    try:
        return [zero_deviation([streamer.whole(r) for r in layer.matrices().values()]) for layer in view.layers]
    finally:
        streamer.close()


def calibration_batches(tokenizer: Any, text: str, samples: int, seq_len: int, where: str) -> torch.Tensor:
    """The first samples x seq_len tokens of the text, as `samples` rows (fewer when the text is short)."""
    import torch

    ids = first_tokens(tokenizer, text, samples * seq_len)
    rows = len(ids) // seq_len
    if rows == 0:
        raise SurgeryError(f"{where}: {len(ids)} tokens of calibration text; one sample needs seq_len={seq_len}")
    return torch.tensor(ids[: rows * seq_len]).reshape(rows, seq_len)
