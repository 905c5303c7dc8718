"""`sce` (Wan et al. 2024, FuseChat): select the entries where the task vectors vary most, weight each model
by its selected task vector's energy, erase disagreeing signs, average (surgery/compute/sce.py)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from surgery.compute.sce import SceMerge
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.registry import Op
from surgery.ops.task_vectors import MergeStep, check_settings, merge_inputs, merged_view
from surgery.ops.varying import Varying, depth_of, first_of
from surgery.recipe.view import ModelView


class SceStep(MergeStep):
    """Select by variance, calculate weights, erase sign conflicts, then merge into the base."""

    edits_any_stack: ClassVar[bool] = True

    op: Literal["sce"]
    models: list[str] = Field(min_length=1)
    select_topk: Varying = Field(default=1.0, description="Fraction of the entries of largest variance kept.")

    @field_validator("models", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        """`{model: PATH}` as the other merges write it is PATH; anything more is named, not a type error."""
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, dict) and "model" in item:
                extra = sorted(set(item) - {"model"})
                if extra:
                    raise ValueError(f"sce takes no {extra[0]!r} per model (it weights each model by its selected "
                                     "task vector's energy); give the model's path alone")
                item = item["model"]
            out.append(item)
        return out


def sce(step: SceStep, view: ModelView, context: OpContext) -> ModelView:
    base, models = merge_inputs(step.op, step.models, view, context, step.tokenizer)
    check_settings(step.op, base, {"select_topk": step.select_topk})

    def update_for(name: str, shape: tuple[int, ...]) -> SceMerge:
        kept = first_of(name, depth_of(base, name), 1.0, step.select_topk)
        if not 0 <= kept <= 1:
            raise SurgeryError(f"{step.op}: select_topk {kept:g} for {name} is outside [0, 1]; it is the fraction of "
                               "the entries of largest variance kept")
        return SceMerge(len(models), shape, kept)

    return merged_view(step.op, base, [base, *models], update_for, step.dtype)


OP = Op("sce", SceStep, sce,
        lambda step: f"Task vectors of {', '.join(step.models)} merged into the base by `sce` "
                     f"(select_topk {step.select_topk}).",
        'Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (SCE)',
        {"op": "sce", "models": ["./prose", "./code"], "select_topk": 0.5})
