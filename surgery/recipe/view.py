"""Lazy model views: what each output tensor is and how to make it, before any data is read.

An op is a pure function from a resolved step and an input view to an output view. A view maps
names to tensor recipes, so ops compose into one streaming pass and nothing is read until the
executor runs. Views know no storage format of surgery's own: an op that writes one (a compact
recursive model, an ensemble, packed weights) attaches a `Storage` saying what is written instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from surgery.checkpoint.config import LayerConfig, per_layer_values, rewrite_config
from surgery.checkpoint.layout import Layout, find_layout
from surgery.checkpoint.reader import FLOAT_DTYPES, Checkpoint
from surgery.recipe.tensor import TensorRecipe


@dataclass(frozen=True)
class LayerOrigin:
    """Where a layer came from (model label and index) and what was done to it, for layer maps."""

    model: str
    index: int
    edits: tuple[str, ...] = ()

    def __str__(self) -> str:
        edits = "".join(f" {e}" for e in self.edits)
        return f"{self.model}[{self.index}]{edits}"

    def edited(self, edit: str) -> LayerOrigin:
        return replace(self, edits=(*self.edits, edit))


@dataclass(frozen=True)
class Layer:
    """One layer: its tensors by suffix (`self_attn.q_proj.weight`), its per-layer config, its origin."""

    tensors: dict[str, TensorRecipe]
    config: LayerConfig
    origin: LayerOrigin

    def matrices(self) -> dict[str, TensorRecipe]:
        """Its weight matrices by suffix: the 2-D floating-point tensors but biases (an MoE's per-expert
        biases are 2-D), what is relaxed, quantized, scored."""
        return {s: r for s, r in self.tensors.items()
                if len(r.shape) == 2 and r.dtype in FLOAT_DTYPES and "bias" not in s.rsplit(".", 1)[-1]}

    def fused_experts(self) -> dict[str, TensorRecipe]:
        """Its MoE experts stored as one 3-D tensor per projection (gpt-oss, Llama 4): experts by matrices."""
        return {s: r for s, r in self.tensors.items()
                if len(r.shape) == 3 and r.dtype in FLOAT_DTYPES and "experts" in s.split(".")[:-1]
                and "bias" not in s.rsplit(".", 1)[-1]}


@dataclass(frozen=True)
class Storage:
    """A model written in one of surgery's own formats: the tensors and config that are written
    instead of the view's own, and a line that says what it is where a layer map does not."""

    tensors: dict[str, TensorRecipe]
    config: dict[str, Any]
    description: str | None = None


@dataclass(frozen=True)
class ModelView:
    """A whole model as recipes: the tensors outside the layers, then the layers in order."""

    source: Checkpoint  # config, tokenizer and other files come from here
    layout: Layout
    outside: dict[str, TensorRecipe]
    layers: tuple[Layer, ...]
    label: str = "model"
    extra_files: dict[str, str | bytes] = field(default_factory=dict)  # written beside the weights (name -> text or bytes)
    storage: Storage | None = None
    config_updates: dict[str, Any] = field(default_factory=dict)  # top-level config keys an op set (a merge's dtype)
    tokenizer_files: dict[str, bytes] | None = None  # the output's tokenizer, replacing the source's (name -> bytes)

    def with_layers(self, layers: Sequence[Layer]) -> ModelView:
        return replace(self, layers=tuple(layers))

    def map_tensors(self, edit: Callable[[str, TensorRecipe], TensorRecipe], label: str | None = None) -> ModelView:
        """The view with every tensor passed through `edit(final name, recipe)`; `label` joins each
        layer's origin edits (for layer maps)."""
        outside = {name: edit(name, recipe) for name, recipe in self.outside.items()}
        layers = []
        for index, layer in enumerate(self.layers):
            tensors = {s: edit(self.layout.layer_name(index, s), r) for s, r in layer.tensors.items()}
            origin = layer.origin if label is None else layer.origin.edited(label)
            layers.append(Layer(tensors=tensors, config=layer.config, origin=origin))
        return replace(self, outside=outside, layers=tuple(layers))

    def tensors(self) -> dict[str, TensorRecipe]:
        """Every tensor of the model the view computes, by its final name (its storage aside)."""
        out = dict(self.outside)
        for index, layer in enumerate(self.layers):
            for suffix, recipe in layer.tensors.items():
                out[self.layout.layer_name(index, suffix)] = recipe
        return out

    def config(self) -> dict[str, Any]:
        """The config of the model the view computes: the source's, with the layer count and per-layer
        lists following the layers (its storage aside)."""
        config = rewrite_config(self.source.config, self.layout.count_key, [layer.config for layer in self.layers],
                                self.layout.config_path)
        return {**config, **self.config_updates}

    def written_tensors(self) -> dict[str, TensorRecipe]:
        """Every tensor written, by name: the storage's, or the model's own."""
        return self.storage.tensors if self.storage is not None else self.tensors()

    def written_config(self) -> dict[str, Any]:
        """config.json as written: the storage's, or the model's own."""
        return self.storage.config if self.storage is not None else self.config()


def standard_view(checkpoint: Checkpoint, label: str, stack: str | None = None,
                  recipes: dict[str, TensorRecipe] | None = None) -> ModelView:
    """The identity view of a standard checkpoint: every tensor a raw copy of itself (or, from a format
    of surgery's own, the given `recipes` of the model it stands for); its layers are those of `stack`
    (default: the language model)."""
    if recipes is None:
        recipes = {name: TensorRecipe.copy_of(info) for name, info in checkpoint.tensors.items()}
    layout = find_layout(checkpoint.config, recipes, where=str(checkpoint.path), stack=stack)
    outside, by_layer = layout.group(recipes)
    configs = per_layer_values(checkpoint.config, layout.num_layers, checkpoint.path, layout.config_path)
    layers = tuple(Layer(tensors=t, config=c, origin=LayerOrigin(label, i)) for i, (t, c) in enumerate(zip(by_layer, configs)))
    return ModelView(source=checkpoint, layout=layout, outside=outside, layers=layers, label=label)


def format_layer_map(origins: Sequence[LayerOrigin]) -> str:
    """Runs of consecutive layers from one model, e.g. `base[0-7] base[12-21] b[3] scaled(o_projx0.5)`."""
    runs: list[list[LayerOrigin]] = []
    for origin in origins:
        last = runs[-1][-1] if runs else None
        if last is not None and last.model == origin.model and last.edits == origin.edits and origin.index == last.index + 1:
            runs[-1].append(origin)
        else:
            runs.append([origin])
    parts = []
    for run in runs:
        first, last = run[0], run[-1]
        span = f"{first.index}" if first is last else f"{first.index}-{last.index}"
        parts.append(f"{first.model}[{span}]" + "".join(f" {e}" for e in first.edits))
    return ", ".join(parts)
