"""`lines` (LiNeS, Wang et al. 2024): scale the current update (current - base) by depth.

Layer l of L gets alpha + beta * l / (L - 1); tensors outside the layers (embeddings, final norm,
head) get alpha. Shallow layers hold general features that fine-tuning should not overwrite, deep
ones the task: scaling the shallow part of the update down keeps what the base knew.
On one fine-tune beta defaults to 1 - alpha. After a merge, alpha defaults to
(1/T) * ||sum_t tau_t||_1 / ||tau_merged||_1 (measured on the data) and beta must be given.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import Field

from surgery.checkpoint.reader import FLOAT_DTYPES
from surgery.compute.updates import Update, WeightedUpdate
from surgery.devices import resolve_device
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.registry import Op
from surgery.ops.task_vectors import check_same_tensors
from surgery.recipe.stream import RecipeStreamer
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import ModelView


class LinesStep(StepModel):
    """Scale the current update by depth, alpha + beta * l / (L - 1)."""

    edits_any_stack: ClassVar[bool] = True

    op: Literal["lines"]
    alpha: float | None = Field(default=None, description="Scale of the first layer and of tensors outside the layers.")
    beta: float | None = Field(default=None, description="Added scale at the last layer (single-task default 1 - alpha).")


def depth_scales(alpha: float, beta: float, layers: int) -> list[float]:
    """lambda(l) for l = 0..L-1."""
    return [alpha + beta * (l / (layers - 1) if layers > 1 else 0.0) for l in range(layers)]


def lines(step: LinesStep, view: ModelView, context: OpContext) -> ModelView:
    base = context.base(step.op)
    check_same_tensors(base, view, step.op)
    merges = [r for r in view.tensors().values() if isinstance(r.compute, Update) and len(r.inputs) > 2]
    alpha, beta = step.alpha, step.beta
    if alpha is None:
        if not merges:
            raise SurgeryError("lines: give alpha (e.g. alpha: 0.2); it has a default only after a merge step")
        alpha = multitask_alpha(merges, context.device)
        context.fits.append({"alpha": alpha})
    if beta is None:
        if merges:
            raise SurgeryError("lines after a merge needs beta (LiNeS tunes it, e.g. beta: 0.5)")
        beta = 1.0 - alpha
    scales = depth_scales(alpha, beta, len(view.layers))
    base_recipes = base.tensors()

    def edit(name: str, recipe: TensorRecipe) -> TensorRecipe:
        placed = view.layout.split(name)
        factor = alpha if placed is None else scales[placed[0]]
        if recipe.dtype not in FLOAT_DTYPES or factor == 1.0:
            return recipe
        if recipe.compute is None:
            return TensorRecipe.computed(recipe.dtype, recipe.shape, (base_recipes[name], recipe), WeightedUpdate((factor,)))
        if isinstance(recipe.compute, Update):
            return replace(recipe, compute=recipe.compute.scaled(factor))
        raise SurgeryError(f"lines: {name} is made by '{recipe.compute.describe()}', not by a task-vector update; "
                           "put lines before that step")

    return view.map_tensors(edit, label=f"lines({alpha:.4g}, {beta:.4g})")


def multitask_alpha(merges: list[TensorRecipe], device: str) -> float:
    """(1/T) * ||sum_t tau_t||_1 / ||tau_merged||_1 over every merged tensor, in float32 block sums."""
    import torch

    tasks = max(len(r.inputs) - 1 for r in merges)
    summed = merged = 0.0
    streamer = RecipeStreamer(resolve_device(device))
    try:
        for recipe in merges:
            compute = streamer.prepared(recipe)
            for inputs in streamer.blocks(recipe):
                base = inputs[0].clone()
                summed += float(torch.stack(inputs[1:]).sub_(base).sum(0).abs_().sum())
                merged += float(compute(inputs).sub_(base).abs_().sum())
    finally:
        streamer.close()
    if merged == 0:
        raise SurgeryError("lines: the merged update is zero, so alpha has no default; give alpha")
    return summed / (tasks * merged)


def describe(step: LinesStep) -> str:
    settings = ", ".join(f"{k} {getattr(step, k)}" for k in ("alpha", "beta") if getattr(step, k) is not None)
    return f"The update scaled by depth (`lines`, LiNeS): {settings or 'defaults'}."


OP = Op("lines", LinesStep, lines, describe,
        'Wang et al. 2024, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging"',
        {"op": "lines", "alpha": 0.2})
