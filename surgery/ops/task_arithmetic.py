"""`task_arithmetic`: theta = theta_base + sum_t weight_t * (theta_t - theta_base)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from surgery.compute.updates import WeightedUpdate
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.registry import Op
from surgery.ops.task_vectors import MergeModel, bare_paths, describe_models, merge_inputs, merged_view
from surgery.recipe.view import ModelView


class TaskArithmeticStep(StepModel):
    """Add the weighted task vectors of the listed models to the base."""

    edits_any_stack: ClassVar[bool] = True

    op: Literal["task_arithmetic"]
    models: list[MergeModel] = Field(min_length=1)

    _bare_paths = field_validator("models", mode="before")(bare_paths)


def task_arithmetic(step: TaskArithmeticStep, view: ModelView, context: OpContext) -> ModelView:
    base, models = merge_inputs(step.op, step.models, view, context)
    update = WeightedUpdate(tuple(m.weight for m in step.models))
    return merged_view(step.op, base, models, lambda name: update)


OP = Op("task_arithmetic", TaskArithmeticStep, task_arithmetic, lambda step: describe_models(step.op, step.models),
        'Ilharco et al. 2023, "Editing Models with Task Arithmetic"',
        {"op": "task_arithmetic", "models": ["./prose", {"model": "./code", "weight": 0.5}]})
