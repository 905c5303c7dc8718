"""`task_arithmetic`: theta = theta_base + lambda * sum_t weight_t * (theta_t - theta_base), with mergekit's
`normalize` (divide by the sum of the weights) and `lambda`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from surgery.compute.sparse import ModelTrim, SparseMerge
from surgery.compute.updates import Update, WeightedUpdate
from surgery.ops.context import OpContext
from surgery.ops.registry import Op
from surgery.ops.task_vectors import (
    MergeModel,
    MergeStep,
    bare_paths,
    check_settings,
    describe_models,
    merge_inputs,
    merged_view,
)
from surgery.ops.varying import Varying, depth_of, first_of
from surgery.recipe.view import ModelView


class TaskArithmeticStep(MergeStep):
    """Add the weighted task vectors of the listed models to the base."""

    edits_any_stack: ClassVar[bool] = True

    op: Literal["task_arithmetic"]
    models: list[MergeModel] = Field(min_length=1)
    normalize: bool = Field(default=False, description="Divide the sum by the sum of the weights.")
    lam: Varying = Field(default=1.0, alias="lambda", description="Scale of the summed task vector.")

    _bare_paths = field_validator("models", mode="before")(bare_paths)


def task_arithmetic(step: TaskArithmeticStep, view: ModelView, context: OpContext) -> ModelView:
    base, models = merge_inputs(step.op, [m.model for m in step.models], view, context, step.tokenizer)
    check_settings(step.op, base, {"lambda": step.lam, **{f"{m.model}'s weight": m.weight for m in step.models}})

    def update_for(name: str, shape: tuple[int, ...]) -> Update:
        t = depth_of(base, name)
        weights = tuple(first_of(name, t, 1.0, m.weight) for m in step.models)
        lam = first_of(name, t, 1.0, step.lam)
        if not step.normalize and lam == 1.0:
            return WeightedUpdate(weights)  # mergekit's exact order of operations, and no stacked copy
        return SparseMerge(tuple(ModelTrim(w) for w in weights), shape, normalize=step.normalize, lam=lam)

    return merged_view(step.op, base, [base, *models], update_for, step.dtype)


def describe(step: TaskArithmeticStep) -> str:
    extra = (", normalized" if step.normalize else "") + (f", lambda {step.lam}" if step.lam != 1.0 else "")
    return describe_models(step.op, step.models, extra)


OP = Op("task_arithmetic", TaskArithmeticStep, task_arithmetic, describe,
        'Ilharco et al. 2023, "Editing Models with Task Arithmetic"',
        {"op": "task_arithmetic", "models": ["./prose", {"model": "./code", "weight": 0.5}]})
