"""Merges that combine the models themselves: `linear`, `slerp`, `nuslerp`, `multislerp`, `karcher`,
`model_stock`. One compute (surgery/compute/sphere.py), mergekit's semantics.

linear, slerp and karcher combine the models; nuslerp and multislerp combine their task vectors when the
plan has a `base:` (the models otherwise); model_stock needs the base. Where the plan has a base, the
result's distance from it is what a later `lines` step scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from surgery.compute.sphere import Grouping, Method, SphereMerge
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.registry import Op
from surgery.ops.task_vectors import (
    MergeModel,
    MergeStep,
    bare_paths,
    check_settings,
    combined_inputs,
    merge_inputs,
    merged_view,
)
from surgery.ops.varying import Varying, depth_of, first_of
from surgery.recipe.view import ModelView


class CombineStep(MergeStep):
    """A merge of the listed models (weights as numbers, gradients or conditions)."""

    edits_any_stack: ClassVar[bool] = True

    models: list[MergeModel] = Field(min_length=1)

    _bare_paths = field_validator("models", mode="before")(bare_paths)

    def starting_model(self) -> str | None:
        return self.models[0].model


class LinearStep(CombineStep):
    """sum_i w_i theta_i, divided by sum_i w_i unless normalize is false (Wortsman et al. 2022, model soups)."""

    op: Literal["linear"]
    normalize: bool = True


class SlerpStep(CombineStep):
    """Spherical interpolation from the first model (t = 0) to the second (t = 1), tensor by tensor."""

    op: Literal["slerp"]
    models: list[MergeModel] = Field(min_length=2, max_length=2)
    t: Varying = Field(description="0 is the first model, 1 the second; a gradient or conditions vary it.")


class NuslerpStep(CombineStep):
    """Spherical interpolation of two models (or task vectors) by weight: t = w_2 / (w_1 + w_2)."""

    op: Literal["nuslerp"]
    models: list[MergeModel] = Field(min_length=2, max_length=2)
    row_wise: bool = Field(default=False, description="Interpolate each dim-0 vector (mergekit's nuslerp_row_wise).")
    flatten: bool = Field(default=True, description="Interpolate whole tensors (mergekit's nuslerp_flatten); "
                                                    "false: each row, or each column with row_wise.")


class MultislerpStep(CombineStep):
    """Barycentric interpolation on the hypersphere of two or more models (or task vectors)."""

    op: Literal["multislerp"]
    normalize_weights: bool = True


class KarcherStep(CombineStep):
    """The weighted Riemannian (Karcher) mean of the models' directions, scaled by their mean norm."""

    op: Literal["karcher"]
    models: list[MergeModel] = Field(min_length=2)
    max_iter: int = Field(default=10, ge=1, le=10_000)
    tol: float = Field(default=1e-5, gt=0)


class ModelStockStep(CombineStep):
    """base + t * mean task vector, t from the task vectors' mean pairwise cosine (Jang et al. 2024)."""

    op: Literal["model_stock"]
    models: list[MergeModel] = Field(min_length=2)
    filter_wise: bool = Field(default=False, description="One t per row rather than per tensor.")

    def starting_model(self) -> str | None:
        return None  # it builds on the base


@dataclass(frozen=True)
class Shape:
    """How an op's compute is set up: whether it centres on the base, and per what it measures angles."""

    centered: str  # "never", "with base" or "always"
    paper: str


SHAPES: dict[str, Shape] = {
    "linear": Shape("never", 'Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models"'),
    "slerp": Shape("never", 'Shoemake 1985, "Animating rotation with quaternion curves" (SLERP), as mergekit merges'),
    "nuslerp": Shape("with base", "mergekit's NuSLERP (Goddard et al.), spherical interpolation by weights"),
    "multislerp": Shape("with base", "Goddard 2025, \"Multi-SLERP\" (barycentric interpolation on the hypersphere)"),
    "karcher": Shape("never", 'Karcher 1977, "Riemannian center of mass and mollifier smoothing", as mergekit merges'),
    "model_stock": Shape("always", 'Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"'),
}


def combine(step: Any, view: ModelView, context: OpContext) -> ModelView:
    refs = [m.model for m in step.models]
    shape = SHAPES[step.op]
    if shape.centered == "always":
        base, models = merge_inputs(step.op, refs, view, context, step.tokenizer)
        start: ModelView = base
    else:
        base, models, start = combined_inputs(step.op, refs, view, context, step.tokenizer)
    has_base = base is not None
    centered = shape.centered == "always" or (shape.centered == "with base" and has_base)
    check_settings(step.op, start, {"t": getattr(step, "t", None),
                                    **{f"{m.model}'s weight": m.weight for m in step.models}})
    grouping: Grouping = "tensor"
    if step.op == "nuslerp" and not step.flatten:
        grouping = "columns" if step.row_wise else "rows"
    if step.op == "model_stock" and step.filter_wise:
        grouping = "rows"
    method: Method = step.op

    def update_for(name: str, tensor_shape: tuple[int, ...]) -> SphereMerge:
        t = depth_of(start, name)
        if step.op == "slerp":
            weight = first_of(name, t, 0.0, step.t)
            weights: tuple[float, ...] = (1 - weight, weight)
        else:
            weights = tuple(first_of(name, t, 1.0, m.weight) for m in step.models)
        if step.op == "linear" and step.normalize and sum(weights) == 0:
            raise SurgeryError(f"linear: the weights of {name} sum to zero, so they cannot be normalized; "
                               "set normalize: false or change them")
        return SphereMerge(method, tensor_shape, weights, has_base=has_base, centered=centered, grouping=grouping,
                           normalize=getattr(step, "normalize", getattr(step, "normalize_weights", True)),
                           max_iter=getattr(step, "max_iter", 10), tol=getattr(step, "tol", 1e-5))

    inputs = [base, *models] if base is not None else models
    return merged_view(step.op, start, inputs, update_for, step.dtype)


def describe(step: Any) -> str:
    listed = ", ".join(m.model + (f" (weight {m.weight})" if m.weight != 1.0 else "") for m in step.models)
    extra = f", t {step.t}" if step.op == "slerp" else ""
    return f"{listed} merged by `{step.op}`{extra}."


STEPS: dict[str, type[CombineStep]] = {"linear": LinearStep, "slerp": SlerpStep, "nuslerp": NuslerpStep,
                                       "multislerp": MultislerpStep, "karcher": KarcherStep,
                                       "model_stock": ModelStockStep}
EXAMPLES: dict[str, dict[str, Any]] = {
    "linear": {"op": "linear", "models": ["./prose", {"model": "./code", "weight": 0.5}]},
    "slerp": {"op": "slerp", "models": ["./prose", "./code"], "t": [0, 0.5, 1]},
    "nuslerp": {"op": "nuslerp", "models": ["./prose", {"model": "./code", "weight": 0.5}]},
    "multislerp": {"op": "multislerp", "models": ["./prose", "./code"]},
    "karcher": {"op": "karcher", "models": ["./prose", "./code"]},
    "model_stock": {"op": "model_stock", "models": ["./prose", "./code"]},
}
OPS = tuple(Op(name, STEPS[name], combine, describe, SHAPES[name].paper, EXAMPLES[name]) for name in STEPS)
