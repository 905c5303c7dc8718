"""What every task-vector merge (`task_arithmetic`, `ties`, `atlas`) shares: its models, and the view.

A merge starts from the plan's `base:` and adds an update made of the listed models' task vectors
(model - base). Every floating-point tensor becomes a computed recipe over the base tensor and the
models' tensors; integer buffers are the base's, copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from surgery.checkpoint.reader import FLOAT_DTYPES
from surgery.compute.updates import Update
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.fields import Strict
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import ModelView


class MergeModel(Strict):
    """A fine-tuned model whose task vector (model - base) takes part in a merge."""

    model: str
    weight: float = Field(default=1.0, description="Its lambda_t: how much of its task vector is added.")


def bare_paths(value: Any) -> Any:
    """A bare path stands for {model: path} (a `models` field validator)."""
    if isinstance(value, list):
        return [{"model": item} if isinstance(item, str) else item for item in value]
    return value


def describe_models(op: str, models: list[MergeModel], extra: str = "") -> str:
    listed = ", ".join(f"{m.model} (weight {m.weight})" for m in models)
    return f"Task vectors of {listed} added to the base (`{op}`{extra})."


def merge_inputs(op: str, entries: list[MergeModel], view: ModelView, context: OpContext) -> tuple[ModelView, list[ModelView]]:
    """The base view and the listed models' views, checked to be one architecture and size."""
    base = context.base(op)
    if view is not base:
        raise SurgeryError(
            f"{op} builds on the base model: make it the first step and leave 'model:' out of the plan "
            f"(or set it to the base, {context.base_ref})"
        )
    models = [context.open_model(entry.model) for entry in entries]
    for model in models:
        check_same_tensors(base, model, op)
    return base, models


def merged_view(op: str, base: ModelView, models: list[ModelView], update_for: Callable[[str], Update]) -> ModelView:
    """The base view with each float tensor replaced by `update_for(name)` over (base, *models)."""
    sources = [model.tensors() for model in models]

    def edit(name: str, recipe: TensorRecipe) -> TensorRecipe:
        if recipe.dtype not in FLOAT_DTYPES:
            return recipe
        inputs = (recipe, *(source[name] for source in sources))
        return TensorRecipe.computed(recipe.dtype, recipe.shape, inputs, update_for(name))

    return base.map_tensors(edit, label=op)


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
