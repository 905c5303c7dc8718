"""Candidate chains tried in memory: the loaded model with its layer list replaced, scored on the
held-out calibration rows (cache off, so a repeated layer computes afresh)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from surgery.checkpoint.layout import LAYER_COUNT_KEYS
from surgery.evaluation.perplexity import perplexity


def with_layers(model: Any, prefix: str, keep: list[int], score: Callable[[], float]) -> float:
    """`score()` with the model's layer list cut down to `keep` (restored afterwards)."""
    import torch

    parent_name, _, attribute = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attribute)
    count_key = next((k for k in LAYER_COUNT_KEYS if hasattr(model.config, k)), None)
    saved = getattr(model.config, count_key) if count_key else None
    setattr(parent, attribute, torch.nn.ModuleList([original[i] for i in keep]))
    if count_key:
        setattr(model.config, count_key, len(keep))
    try:
        return score()
    finally:
        setattr(parent, attribute, original)
        if count_key:
            setattr(model.config, count_key, saved)


def held_out_perplexity(model: Any, rows: Any) -> float:
    """Perplexity over the rows, each scored alone from its first token (one window per row)."""
    length = rows.shape[1]
    return perplexity(model, rows.reshape(-1), window=length, stride=length, batch_size=1).perplexity


def chain_perplexity(model: Any, prefix: str, rows: Any, chain: list[int]) -> float:
    """Held-out perplexity of the model whose layers are `chain`."""
    return with_layers(model, prefix, chain, lambda: held_out_perplexity(model, rows))
