"""`materialize`: a compact recursive model (written by `tie`) or trit-planes (by `ptqtp`) as a standard checkpoint."""

from __future__ import annotations

from typing import Literal

from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.registry import Op
from surgery.recipe.view import ModelView


class MaterializeStep(StepModel):
    """A compact recursive model as a standard checkpoint (each depth: shared + B A)."""

    op: Literal["materialize"]


def materialize(step: MaterializeStep, view: ModelView, context: OpContext) -> ModelView:
    """A compact or trit-plane checkpoint opens as the model it stands for already (`open_view`), so writing
    the view as it is writes the standard checkpoint; on a standard checkpoint this is a plain copy."""
    return view


OP = Op("materialize", MaterializeStep, materialize,
        lambda step: "A compact recursive model written as a standard checkpoint (`materialize`).",
        'Bae et al. 2024, "Relaxed Recursive Transformers" (the compact model, each depth computed in full)',
        {"op": "materialize"})
