"""Per-layer config values, so they follow their layers when layers move.

transformers validates per-layer lists (`layer_types`, ...) against the layer count, and derives
them from scalar settings (`max_window_layers`, `sliding_window_pattern`, ...) when they are absent.
A changed layer structure therefore writes them explicitly: each output layer carries the values
its source layer had in the source model's effective config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

# Lists with one entry per layer.
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type")
# Lists of layer indices that have some property.
INDEX_LIST_KEYS = ("mlp_only_layers", "moe_layers", "full_attn_idxs")
# Scalar settings from which transformers derives per-layer lists when none are written.
DERIVATION_HINTS = (
    "max_window_layers", "sliding_window_pattern", "use_sliding_window", "sliding_window",
    "no_rope_layer_interval", "interleave_moe_layer_step", "decoder_sparse_step", "moe_layer_freq",
    "first_k_dense_replace", "attention_chunk_size",
)

LayerConfig = dict[str, Any]

log = logging.getLogger(__name__)


def per_layer_values(config: dict[str, Any], num_layers: int, folder: Path) -> list[LayerConfig]:
    """One dict per layer with the per-layer config values that apply to it."""
    effective = _effective_lists(config, folder)
    layers: list[LayerConfig] = [{} for _ in range(num_layers)]
    for key in PER_LAYER_KEYS:
        values = effective.get(key)
        if isinstance(values, list) and len(values) == num_layers:
            for layer, value in zip(layers, values):
                layer[key] = value
    for key in INDEX_LIST_KEYS:
        values = effective.get(key)
        if isinstance(values, list) and all(isinstance(v, int) for v in values):
            chosen = set(values)
            for i, layer in enumerate(layers):
                layer[key] = i in chosen
    return layers


def rewrite_config(config: dict[str, Any], count_key: str, layers: list[LayerConfig]) -> dict[str, Any]:
    """config.json for a model whose layers carry `layers` (one per output layer, in order)."""
    out = dict(config)
    out[count_key] = len(layers)
    keys = {k for layer in layers for k in layer}
    for key in PER_LAYER_KEYS:
        if key in keys:
            out[key] = [layer[key] for layer in layers]
    for key in INDEX_LIST_KEYS:
        if key in keys:
            out[key] = [i for i, layer in enumerate(layers) if layer[key]]
    return out


def _effective_lists(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The per-layer lists transformers would use for this config.

    Explicit lists are taken as written. When none is written but a scalar setting could derive one,
    transformers' own config class is asked, so the derivation is transformers' and not a copy of it.
    """
    keys = PER_LAYER_KEYS + INDEX_LIST_KEYS
    if any(k in config for k in keys) or not any(k in config for k in DERIVATION_HINTS):
        return config
    try:
        from transformers import AutoConfig

        effective = AutoConfig.from_pretrained(folder).to_dict()
    except Exception as e:  # an architecture transformers does not know: the written config is all there is
        log.debug("transformers could not read %s (%s); using config.json as written", folder, e)
        return config
    return {k: effective[k] for k in keys if k in effective}
