"""`chain`: a model whose layers are any sequence of source layers (drop, loop, reorder, stack).

Layers may come from several models of one architecture (a frankenmerge, as mergekit's
passthrough). Each output layer carries its source's per-layer config values along, and its
tensors are raw copies unless the entry scales some of them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from surgery.checkpoint.reader import FLOAT_DTYPES
from surgery.compute.scale import Scaled
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel, Strict, nonempty_list, parse_layers
from surgery.ops.registry import Op
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import Layer, ModelView


class LayerEntry(Strict):
    """A run of layers, optionally from another model, optionally with some tensors scaled."""

    model: str | None = Field(default=None, description="Source model; default: the plan's model.")
    layers: list[int] = Field(description="Layer indices: ints and inclusive 'a-b' ranges.")
    scale: dict[str, float] | None = Field(
        default=None, description="Multiply the tensors of these modules (e.g. o_proj: 0.5) in these layers."
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> list[int]:
        return parse_layers(value)


class ChainStep(StepModel):
    """Write a model whose layers are any sequence of source layers."""

    edits_any_stack: ClassVar[bool] = True

    op: Literal["chain"]
    layers: list[LayerEntry] = Field(min_length=1)

    @field_validator("layers", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> list[Any]:
        """Bare ints and ranges are entries from the current model; consecutive ones form one entry."""
        entries: list[Any] = []
        for item in nonempty_list(value):
            if isinstance(item, dict):
                entries.append(item)
            elif entries and isinstance(entries[-1], LayerEntry) and entries[-1].model is None:
                entries[-1] = LayerEntry(layers=entries[-1].layers + parse_layers(item))
            else:
                entries.append(LayerEntry(layers=parse_layers(item)))
        return entries

    def starting_model(self) -> str | None:
        return next((entry.model for entry in self.layers if entry.model is not None), None)


def chain(step: ChainStep, view: ModelView, context: OpContext) -> ModelView:
    """The view whose layers are the step's entries, in order, from the current or named models."""
    layers: list[Layer] = []
    for entry in step.layers:
        source = view if entry.model is None else context.open_model(entry.model)
        if source is not view:
            _check_same_architecture(view, source)
        for index in entry.layers:
            if index >= len(source.layers):
                last = len(source.layers) - 1
                raise SurgeryError(
                    f"chain: layer {index} is out of range: {source.label} has {len(source.layers)} layers (0-{last})"
                )
            layer = source.layers[index]
            layers.append(_scaled(layer, entry, index) if entry.scale else layer)
    return view.with_layers(layers)


def _scaled(layer: Layer, entry: LayerEntry, index: int) -> Layer:
    tensors = dict(layer.tensors)
    for module, factor in (entry.scale or {}).items():
        matched = [suffix for suffix in tensors if f".{module}." in f".{suffix}."]
        if not matched:
            names = sorted({part for suffix in tensors for part in suffix.split(".")[:-1]})
            raise SurgeryError(
                f"chain: scale key {module!r} matches no tensor of layer {index}; modules there: {', '.join(names)}"
            )
        for suffix in matched:
            recipe = tensors[suffix]
            if recipe.dtype not in FLOAT_DTYPES:
                raise SurgeryError(f"chain: cannot scale {suffix} of layer {index}: it holds integers ({recipe.dtype})")
            tensors[suffix] = scaled(recipe, factor)
    edit = "scaled(" + ", ".join(f"{m}x{f:g}" for m, f in (entry.scale or {}).items()) + ")"
    return Layer(tensors=tensors, config=layer.config, origin=layer.origin.edited(edit))


def scaled(recipe: TensorRecipe, factor: float) -> TensorRecipe:
    """The recipe times `factor`: a computed one's compute scaled in the same pass, without rounding between."""
    if recipe.compute is None:
        return TensorRecipe.computed(recipe.dtype, recipe.shape, (recipe,), Scaled(factor))
    return replace(recipe, compute=Scaled(factor, recipe.compute))


def _signature(layer: Layer) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {suffix: (r.dtype, r.shape) for suffix, r in layer.tensors.items()}


def _check_same_architecture(view: ModelView, other: ModelView) -> None:
    """Layers from another model must fit this one: same model type, tensors, shapes and dtypes."""
    mine, theirs = view.source.config.get("model_type"), other.source.config.get("model_type")
    if mine != theirs:
        raise SurgeryError(
            f"chain: {other.label} is a {theirs!r} model but {view.label} is {mine!r}; "
            "a frankenmerge needs models of one architecture"
        )
    for name, recipe in view.outside.items():
        theirs_recipe = other.outside.get(name)
        if theirs_recipe is not None and theirs_recipe.shape != recipe.shape:
            raise SurgeryError(
                f"chain: {other.label} has {name} of shape {list(theirs_recipe.shape)} but {view.label} has "
                f"{list(recipe.shape)}; a frankenmerge needs models of one size"
            )
    known = [_signature(layer) for layer in view.layers]
    for index, layer in enumerate(other.layers):
        signature = _signature(layer)
        if signature in known:
            continue
        reference = known[min(index, len(known) - 1)]
        for suffix, (dtype, shape) in sorted(signature.items()):
            if reference.get(suffix) != (dtype, shape):
                mine_desc = reference.get(suffix)
                raise SurgeryError(
                    f"chain: layer {index} of {other.label} has {suffix} {dtype}{list(shape)} but {view.label} has "
                    f"{'none' if mine_desc is None else f'{mine_desc[0]}{list(mine_desc[1])}'}; "
                    "a frankenmerge needs models of one architecture and size"
                )
        missing = sorted(set(reference) - set(signature))
        raise SurgeryError(f"chain: layer {index} of {other.label} lacks {missing[0]}; models differ in architecture")


def describe(step: ChainStep) -> str:
    entries = [", ".join(map(str, e.layers)) + (f" of {e.model}" if e.model else "")
               + (f" (scaled {e.scale})" if e.scale else "") for e in step.layers]
    return "Layers rearranged (`chain`): the new layers are source layers " + "; ".join(entries) + "."


OP = Op("chain", ChainStep, chain, describe,
        'CoLa, Li et al. 2025, "Skip a Layer or Loop it? Test-Time Depth Adaptation of Pretrained LLMs"; '
        "mergekit's passthrough merge",
        {"op": "chain", "layers": ["0-3", 3, 5]})
