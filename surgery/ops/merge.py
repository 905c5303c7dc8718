"""Task-vector merges: `task_arithmetic` and `ties`, and what every merge shares.

A merge starts from the plan's `base:` and adds an update made of the listed models' task vectors
(model - base). Every floating-point tensor becomes a computed recipe over the base tensor and the
models' tensors; integer buffers are the base's, copied.
"""

from __future__ import annotations

from collections.abc import Callable

from surgery.checkpoint.reader import FLOAT_DTYPES
from surgery.compute.updates import TiesUpdate, Update, WeightedUpdate
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.plan.schema import MergeModel, TaskArithmeticStep, TiesStep
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import ModelView


def task_arithmetic(step: TaskArithmeticStep, view: ModelView, context: OpContext) -> ModelView:
    base, models = merge_inputs(step.op, step.models, view, context)
    update = WeightedUpdate(tuple(m.weight for m in step.models))
    return merged_view(step.op, base, models, lambda name: update)


def ties(step: TiesStep, view: ModelView, context: OpContext) -> ModelView:
    base, models = merge_inputs(step.op, step.models, view, context)
    update = TiesUpdate(tuple(m.weight for m in step.models), step.density, step.lam)
    return merged_view(step.op, base, models, lambda name: update)


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
