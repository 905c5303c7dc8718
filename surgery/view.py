"""Lazy model views: what each output tensor is and how to make it, before any data is read.

An op is a pure function from a resolved step and an input view to an output view. A view maps
names to tensor recipes (copy these source bytes, or compute from these source tensors), so ops
compose into one streaming pass and nothing is read until the executor runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from surgery.checkpoint.config import LayerConfig, per_layer_values, rewrite_config
from surgery.checkpoint.layout import Layout, find_layout
from surgery.checkpoint.reader import DTYPE_SIZES, Checkpoint, TensorInfo, numel

if TYPE_CHECKING:
    import torch


class Compute(Protocol):
    """A pure tensor function; `describe` makes recipes printable and hashable.

    Inputs arrive as float32 blocks the compute may overwrite; it returns a float tensor, which the
    executor casts to the recipe's dtype. An `elementwise` compute gets aligned blocks of its flattened
    inputs, so a tensor of any size streams through bounded memory; otherwise it gets whole tensors.
    `prepare` sees every block once before the first call, for whole-tensor statistics (thresholds).
    """

    elementwise: bool

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor: ...

    def prepare(self, blocks: Callable[[], Iterator[list[torch.Tensor]]]) -> Compute: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class TensorRecipe:
    """One output tensor: its dtype and shape, its source tensors, and how to combine them.

    With `compute` None the tensor is `inputs[0]`'s raw bytes, copied without decoding.
    """

    dtype: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]
    compute: Compute | None = None

    @classmethod
    def copy_of(cls, info: TensorInfo) -> TensorRecipe:
        return cls(dtype=info.dtype, shape=info.shape, inputs=(info,))

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_SIZES[self.dtype]

    def describe(self) -> str:
        sources = ", ".join(f"{i.file.parent.name}/{i.name}" for i in self.inputs)
        return f"copy {sources}" if self.compute is None else f"{self.compute.describe()} of {sources}"


@dataclass(frozen=True)
class Layer:
    """One layer: its tensors by suffix (`self_attn.q_proj.weight`), its per-layer config, its origin."""

    tensors: dict[str, TensorRecipe]
    config: LayerConfig
    origin: LayerOrigin


@dataclass(frozen=True)
class LayerOrigin:
    """Where a layer came from (model label and index) and what was done to it, for layer maps."""

    model: str
    index: int
    edits: tuple[str, ...] = ()

    def __str__(self) -> str:
        edits = "".join(f" {e}" for e in self.edits)
        return f"{self.model}[{self.index}]{edits}"


@dataclass
class ModelView:
    """A whole model as recipes: the tensors outside the layers, then the layers in order."""

    source: Checkpoint  # config, tokenizer and other files come from here
    layout: Layout
    outside: dict[str, TensorRecipe]
    layers: list[Layer]
    label: str = "model"
    extra_files: dict[str, str] = field(default_factory=dict)  # written beside the weights (name -> text)

    def with_layers(self, layers: list[Layer]) -> ModelView:
        return replace(self, layers=layers)

    def map_tensors(self, edit: Callable[[str, TensorRecipe], TensorRecipe], label: str | None = None) -> ModelView:
        """The view with every tensor passed through `edit(final name, recipe)`; `label` joins each
        layer's origin edits (for layer maps)."""
        outside = {name: edit(name, recipe) for name, recipe in self.outside.items()}
        layers = []
        for index, layer in enumerate(self.layers):
            tensors = {s: edit(self.layout.layer_name(index, s), r) for s, r in layer.tensors.items()}
            origin = layer.origin if label is None else replace(layer.origin, edits=(*layer.origin.edits, label))
            layers.append(Layer(tensors=tensors, config=layer.config, origin=origin))
        return replace(self, outside=outside, layers=layers)

    def recipes(self) -> dict[str, TensorRecipe]:
        """Every output tensor by its final name."""
        out = dict(self.outside)
        for index, layer in enumerate(self.layers):
            for suffix, recipe in layer.tensors.items():
                out[self.layout.layer_name(index, suffix)] = recipe
        return out

    def config(self) -> dict[str, Any]:
        """config.json for this view: the layer count and per-layer lists follow the layers."""
        return rewrite_config(self.source.config, self.layout.count_key, [layer.config for layer in self.layers])


@dataclass
class StoredView(ModelView):
    """A model written in one of surgery's own formats (compact recursive, ensemble): `layers` are the
    depths it computes (for layer maps), while `stored` and `stored_config` are what is written."""

    stored: dict[str, TensorRecipe] = field(default_factory=dict)
    stored_config: dict[str, Any] = field(default_factory=dict)
    description: str | None = None  # printed instead of the layer map, when the layers do not tell it

    def recipes(self) -> dict[str, TensorRecipe]:
        return self.stored

    def config(self) -> dict[str, Any]:
        return self.stored_config


def open_view(checkpoint: Checkpoint, label: str) -> ModelView:
    """The identity view of a checkpoint: every tensor a raw copy of itself (a compact recursive
    checkpoint: the L-layer model it stands for)."""
    from surgery.recursive import is_compact, open_compact_view

    if is_compact(checkpoint.config):
        return open_compact_view(checkpoint, label)
    layout = find_layout(checkpoint.config, checkpoint.tensors, where=str(checkpoint.path))
    outside, by_layer = layout.group({name: TensorRecipe.copy_of(info) for name, info in checkpoint.tensors.items()})
    configs = per_layer_values(checkpoint.config, layout.num_layers, checkpoint.path)
    layers = [Layer(tensors=t, config=c, origin=LayerOrigin(label, i)) for i, (t, c) in enumerate(zip(by_layer, configs))]
    return ModelView(source=checkpoint, layout=layout, outside=outside, layers=layers, label=label)
