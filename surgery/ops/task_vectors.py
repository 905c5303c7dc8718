"""What every merge shares: its models, its inputs, and the view.

A task-vector merge starts from the plan's `base:` and adds an update made of the listed models' task
vectors (model - base); the others (linear, slerp, karcher, ...) combine the models themselves and start
from the first one, with the base (where the plan has one) as a first input so LiNeS can scale the
result's distance from it. Every floating-point tensor becomes a computed recipe over the inputs'
tensors; integer buffers are the starting model's, copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field

from surgery.checkpoint.blocks import STORED_DTYPES
from surgery.checkpoint.reader import FLOAT_DTYPES
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel, Strict
from surgery.ops.varying import Varying, check_filters
from surgery.ops.vocabulary import MergeInput, aligned, check_one_vocabulary
from surgery.recipe.tensor import Compute, TensorRecipe
from surgery.recipe.view import ModelView

OutDtype = Literal["float32", "bfloat16", "float16"]


class MergeStep(StepModel):
    """What every merge step takes besides its models: the dtype its merged tensors are written in."""

    dtype: OutDtype | None = Field(default=None, description="The merged tensors' dtype (mergekit's out_dtype); "
                                                             "default: each tensor's own, as the base has it.")
    tokenizer: str | None = Field(default=None, description="Where the models' vocabularies differ: base, union or "
                                                            "one of the models, the output's vocabulary (rows "
                                                            "aligned by token).")


class MergeModel(Strict):
    """A model that takes part in a merge, and its weight (a number, a gradient over depth, or conditions)."""

    model: str
    weight: Varying = Field(default=1.0, description="Its lambda_t: how much of its task vector is added.")


class TrimmedModel(MergeModel):
    """A model of a trimming merge (TIES, DARE, breadcrumbs, DELLA), with its own trim settings."""

    density: Varying | None = Field(default=None, description="Fraction of its task vector kept (the step's if unset).")
    gamma: Varying | None = Field(default=None, description="breadcrumbs: fraction of largest entries dropped.")
    epsilon: Varying | None = Field(default=None, description="della: spread of the keep probabilities.")


def bare_paths(value: Any) -> Any:
    """A bare path stands for {model: path} (a `models` field validator)."""
    if isinstance(value, list):
        return [{"model": item} if isinstance(item, str) else item for item in value]
    return value


def describe_models(op: str, models: list[MergeModel], extra: str = "") -> str:
    listed = ", ".join(f"{m.model} (weight {m.weight})" for m in models)
    return f"Task vectors of {listed} added to the base (`{op}`{extra})."


def merge_inputs(op: str, refs: list[str], view: ModelView, context: OpContext, tokenizer: str | None = None,
                 can_align: bool = True) -> tuple[ModelView, list[ModelView]]:
    """The base view and the listed models' views, checked to be one architecture and size, their vocabulary
    rows aligned by token where `tokenizer` says (surgery/ops/vocabulary.py)."""
    base = context.base(op)
    if view is not base:
        raise SurgeryError(
            f"{op} builds on the base model: make it the first step and leave 'model:' out of the plan "
            f"(or set it to the base, {context.base_ref})"
        )
    start = MergeInput(str(context.base_ref), base)
    members = [start, *(MergeInput(ref, context.open_model(ref)) for ref in refs)]
    base, *models = _aligned(op, tokenizer, start, members, start, can_align)
    for model in models:
        check_same_tensors(base, model, op)
    return base, models


def combined_inputs(op: str, refs: list[str], view: ModelView, context: OpContext,
                    tokenizer: str | None = None) -> tuple[ModelView | None, list[ModelView], ModelView]:
    """For a merge of the models themselves: the plan's base if it has one, the models' views, and the view
    the output builds on: the plan's model, one of the merged ones or the base (its structure, config and
    tokenizer; the first model when the plan leaves `model:` out). Vocabulary rows aligned as `tokenizer` says."""
    members = [MergeInput(ref, context.open_model(ref)) for ref in refs]
    base = None
    if context.base_ref is not None:
        base = next((m for m in members if m.ref == context.base_ref), None) or \
            MergeInput(context.base_ref, context.open_model(context.base_ref))
    everyone = members + ([base] if base is not None and base not in members else [])
    start = next((m for m in everyone if m.view is view), None)
    if start is None:
        raise SurgeryError(f"{op} builds on one of its models: make it the first step and leave 'model:' out of "
                           f"the plan (or set it to one of them, or to the base)")
    views = _aligned(op, tokenizer, start, everyone, base, True)
    for model in views:
        check_same_tensors(views[everyone.index(start)], model, op)
    return (views[everyone.index(base)] if base is not None else None, views[:len(members)],
            views[everyone.index(start)])


def _aligned(op: str, tokenizer: str | None, start: MergeInput, members: list[MergeInput], base: MergeInput | None,
             can_align: bool) -> list[ModelView]:
    if not can_align:
        check_one_vocabulary(op, members, f"{op} needs models of one vocabulary")
        return [m.view for m in members]
    return aligned(op, tokenizer, start, members, base)


def merged_view(op: str, view: ModelView, inputs: list[ModelView],
                update_for: Callable[[str, tuple[int, ...]], Compute], dtype: OutDtype | None = None) -> ModelView:
    """The view with each float tensor replaced by `update_for(name, shape)` over the inputs' tensors,
    rounded once to `dtype` (default: the tensor's own); config.json's dtype follows it."""
    sources = [model.tensors() for model in inputs]

    def edit(name: str, recipe: TensorRecipe) -> TensorRecipe:
        if recipe.dtype not in FLOAT_DTYPES:
            return recipe
        return TensorRecipe.computed(STORED_DTYPES[dtype] if dtype else recipe.dtype, recipe.shape,
                                     tuple(source[name] for source in sources), update_for(name, recipe.shape))

    merged = view.map_tensors(edit, label=op)
    if dtype is None:
        return merged
    keys = [key for key in ("dtype", "torch_dtype") if key in view.source.config] or ["torch_dtype"]
    return replace(merged, config_updates={**merged.config_updates, **dict.fromkeys(keys, dtype)})


def check_settings(op: str, view: ModelView, settings: dict[str, Varying | None]) -> None:
    """Refuse a filter that matches none of the merged tensors."""
    names = [name for name, recipe in view.tensors().items() if recipe.dtype in FLOAT_DTYPES]
    for parameter, setting in settings.items():
        check_filters(op, parameter, setting, names)


def check_same_tensors(base: ModelView, other: ModelView, op: str) -> None:
    """Task vectors need the same tensors, of the same shapes, as the base."""
    mine, theirs = base.source.config.get("model_type"), other.source.config.get("model_type")
    if mine != theirs:
        raise SurgeryError(f"{op}: {other.label} is a {theirs!r} model but the base is {mine!r}; "
                           "task vectors need models of one architecture")
    base_recipes, other_recipes = base.tensors(), other.tensors()
    for name, recipe in base_recipes.items():
        found = other_recipes.get(name)
        if found is None:
            raise SurgeryError(f"{op}: {other.label} has no tensor {name}, which the base has; "
                               "task vectors need models of one architecture")
        if found.shape != recipe.shape:
            raise SurgeryError(f"{op}: {other.label} has {name} of shape {list(found.shape)} but the base has "
                               f"{list(recipe.shape)}; task vectors need models of one size")
    extra = sorted(set(other_recipes) - set(base_recipes))
    if extra:
        raise SurgeryError(f"{op}: {other.label} has tensor {extra[0]}, which the base lacks; "
                           "task vectors need models of one architecture")
