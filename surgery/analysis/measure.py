"""`surgery analyze`: per-layer importance and redundancy, measured on calibration text in one pass.

Per layer, averaged over tokens (hooks on the transformers model):
- `bi` (ShortGPT) = 1 - cos(h_in, h_out) and `lim` = -cos(h_in, h_out), as in surgery/evaluation/importance.py;
- `zd`: the fraction of weights with |z| > 1, averaged over the layer's matrices;
- Csordas et al. 2025's residual contributions: `attn` = ||attn_out|| / ||h||, `mlp` = ||mlp_out|| /
  ||h + attn_out||, `layer` = ||h_out - h|| / ||h|| (None where the layer has no attention/MLP child).
Redundancy (PruneMe): the angular distance arccos(cos(h_i, h_{i+n})) / pi between the hidden states
entering layer i and layer i+n, for n = 1..4; the block of n layers whose removal changes least.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.evaluation import importance
from surgery.evaluation.data import load_text
from surgery.evaluation.loading import load_for_eval
from surgery.evaluation.models import layer_modules
from surgery.recipe.view import standard_view

MAX_BLOCK = 4


@dataclass
class LayerMetrics:
    index: int
    bi: float
    lim: float
    zd: float
    attn: float | None
    mlp: float | None
    layer: float


@dataclass
class Analysis:
    model: str
    tokens: int
    layers: list[LayerMetrics]
    distances: dict[int, list[float]]  # n -> angular distance from layer i's input to layer i+n's, for each i
    best_blocks: dict[int, int] = field(default_factory=dict)  # n -> first layer of the best block to remove

    def bi_ranks(self) -> dict[int, int]:
        """Each layer's rank by Block Influence, 1 for the one that changes its input most."""
        return {m.index: rank + 1 for rank, m in enumerate(sorted(self.layers, key=lambda m: -m.bi))}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "tokens": self.tokens, "layers": [asdict(m) for m in self.layers],
                "distances": {str(n): d for n, d in self.distances.items()},
                "best_blocks": {str(n): {"start": i, "layers": list(range(i, i + n)), "distance": self.distances[n][i]}
                                for n, i in self.best_blocks.items()}}


class _Accumulator:
    """Sums of per-token ratios and cosines, kept per layer and per distance, over all batches."""

    def __init__(self, depth: int) -> None:
        self.cos = [0.0] * depth
        self.attn = [0.0] * depth
        self.mlp = [0.0] * depth
        self.layer = [0.0] * depth
        self.distance = {n: [0.0] * (depth - n + 1) for n in range(1, min(MAX_BLOCK, depth) + 1)}
        self.tokens = 0


def analyze_model(model: Any, layers: Any, batches: Any, zd: list[float], label: str) -> Analysis:
    """Metrics of a loaded model whose layer modules are `layers`, on token batches (rows); `zd` is
    each layer's ZD, measured from the weights."""
    import torch

    depth = len(layers)
    sums = _Accumulator(depth)
    states: dict[int, Any] = {}  # layer index -> hidden state entering it (and depth -> leaving the last)
    parts: dict[tuple[int, str], Any] = {}

    def ratio(numerator: Any, denominator: Any) -> float:
        return float((numerator.float().norm(dim=-1) / denominator.float().norm(dim=-1).clamp_min(1e-12)).sum())

    def on_layer(index: int, entering: Any, leaving: Any) -> None:
        states[index], states[index + 1] = entering, leaving
        cosine = torch.nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
        sums.cos[index] += float(cosine.sum())
        sums.layer[index] += ratio(leaving - entering, entering)
        attn, mlp = parts.pop((index, "attn"), None), parts.pop((index, "mlp"), None)
        if attn is not None:
            sums.attn[index] += ratio(attn, entering)
        if mlp is not None:
            sums.mlp[index] += ratio(mlp, entering + (attn if attn is not None else 0))

    def on_part(index: int, kind: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            parts[(index, kind)] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = []
    has_parts = {"attn": True, "mlp": True}
    for index, layer in enumerate(layers):
        for kind in ("attn", "mlp"):
            child = _child(layer, kind)
            has_parts[kind] &= child is not None
            if child is not None:
                handles.append(child.register_forward_hook(on_part(index, kind)))
    try:
        with importance.watching_layers(layers, on_layer):
            for row in importance.forward_rows(model, batches):
                sums.tokens += row.numel()
                for n, totals in sums.distance.items():
                    for i in range(len(totals)):
                        cosine = torch.nn.functional.cosine_similarity(states[i].float(), states[i + n].float(), dim=-1)
                        totals[i] += float((cosine.clamp(-1, 1).acos() / math.pi).sum())
                states.clear()
    finally:
        for handle in handles:
            handle.remove()
    count = sums.tokens
    cosines = [c / count for c in sums.cos]
    metrics = [LayerMetrics(i, importance.block_influence(cosines)[i], importance.lim(cosines)[i], zd[i],
                            sums.attn[i] / count if has_parts["attn"] else None,
                            sums.mlp[i] / count if has_parts["mlp"] else None, sums.layer[i] / count)
               for i in range(depth)]
    distances = {n: [t / count for t in totals] for n, totals in sums.distance.items()}
    best = {n: min(range(len(d)), key=lambda i: (d[i], i)) for n, d in distances.items()}
    return Analysis(label, count, metrics, distances, best)


def _child(layer: Any, kind: str) -> Any:
    """The layer's attention (`attn`) or feed-forward (`mlp`) submodule, found by name."""
    names = ("self_attn", "attn", "attention", "self_attention") if kind == "attn" else ("mlp", "feed_forward", "ffn")
    for name in names:
        child = getattr(layer, name, None)
        if child is not None:
            return child
    return None


@dataclass
class Session:
    """A loaded model with its measurements: what `--suggest` works from."""

    path: Path
    data: list[str]
    device: str  # resolved
    analysis: Analysis
    model: Any
    prefix: str
    held_out: Any  # calibration rows not used for the metrics, for scoring candidate plans
    input_dims: list[int]
    max_memory: int | None = None  # bytes of weights a model holds on the device; trials keep to it too


def analyze(path: str | Path, data: list[str], samples: int, seq_len: int, device: str,
            max_memory: int | None = None) -> Session:
    """Load a standard checkpoint (at most `max_memory` bytes of its weights on the device) and measure it
    on `samples` rows of `seq_len` tokens of the data; a further quarter of rows (at least 2) is held out
    for `--suggest`."""
    view = standard_view(Checkpoint.open(path), str(path))
    layout = view.layout
    loaded = load_for_eval(path, device=device, dtype="float32", max_memory=max_memory)
    text = "\n\n".join(load_text(spec).text for spec in data)
    held = max(2, samples // 4)
    rows = importance.calibration_batches(loaded.tokenizer, text, samples + held, seq_len, "analyze --data")
    if len(rows) < 3:
        raise SurgeryError(f"analyze: the data gives {len(rows)} rows of {seq_len} tokens; give more text or a "
                           "smaller --seq-len")
    held = min(held, len(rows) // 3)
    layers = layer_modules(loaded.model, layout.prefix, layout.num_layers)
    analysis = analyze_model(loaded.model, layers, rows[:-held], importance.zero_deviations(view), str(path))
    input_dims = [r.shape[1] for layer in view.layers for r in layer.matrices().values()]
    return Session(Path(path), data, loaded.device, analysis, loaded.model, layout.prefix, rows[-held:], input_dims,
                   max_memory)
