"""`ties` (TIES-merging): trim each task vector, elect signs, average the agreeing entries."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from surgery.compute.updates import TiesUpdate
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.registry import Op
from surgery.ops.task_vectors import MergeModel, bare_paths, describe_models, merge_inputs, merged_view
from surgery.recipe.view import ModelView


class TiesStep(StepModel):
    """Trim, elect sign, disjoint mean, then base + lambda * merged."""

    edits_any_stack: ClassVar[bool] = True

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    op: Literal["ties"]
    models: list[MergeModel] = Field(min_length=1)
    density: float = Field(default=0.2, gt=0, le=1, description="Fraction of each task vector's entries kept.")
    lam: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")

    _bare_paths = field_validator("models", mode="before")(bare_paths)


def ties(step: TiesStep, view: ModelView, context: OpContext) -> ModelView:
    base, models = merge_inputs(step.op, step.models, view, context)
    update = TiesUpdate(tuple(m.weight for m in step.models), step.density, step.lam)
    return merged_view(step.op, base, models, lambda name: update)


OP = Op("ties", TiesStep, ties,
        lambda step: describe_models(step.op, step.models, f", density {step.density}, lambda {step.lam}"),
        'Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"',
        {"op": "ties", "models": ["./prose", "./code"], "density": 0.3})
