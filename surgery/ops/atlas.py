"""`atlas` (aTLAS, Zhang et al. 2024): theta = theta_base + sum_t Lambda_t tau_t, one coefficient per
(task vector, block). A block is a tensor, a layer (plus `outside` for the tensors outside the
layers), or a module kind (attention, mlp, norm, embedding, other).

Coefficients are given in the plan or learned on text (`atlas_learn`); learned ones are recorded in
surgery.json in the plan's own `coefficients` form, so pasting them back re-runs the merge exactly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from surgery.checkpoint.modules import module_kind
from surgery.checkpoint.reader import FLOAT_DTYPES
from surgery.compute.updates import WeightedUpdate
from surgery.devices import check_device_name, resolve_device
from surgery.errors import SurgeryError
from surgery.evaluation.data import load_text
from surgery.ops.atlas_learn import LearnSettings, learn_coefficients
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.fit_memo import finite_numbers, folder_stamp, remembered, text_digest
from surgery.ops.registry import Op
from surgery.ops.task_vectors import MergeModel, bare_paths, describe_models, merge_inputs, merged_view
from surgery.recipe.view import ModelView

OUTSIDE = "outside"
Coefficients = dict[str, dict[str, float]]  # model reference -> block -> coefficient
Granularity = Literal["tensor", "layer", "module"]


class AtlasStep(StepModel):
    """theta = theta_base + sum_t Lambda_t tau_t, one coefficient per block."""

    op: Literal["atlas"]
    models: list[MergeModel] = Field(min_length=1)
    granularity: Granularity = "tensor"
    coefficients: dict[str, float | dict[str, float]] | None = Field(
        default=None, description="Per model: one number for every block, or a number per block."
    )
    learn: LearnSettings | None = None

    _bare_paths = field_validator("models", mode="before")(bare_paths)

    @field_validator("coefficients", mode="before")
    @classmethod
    def _block_names(cls, value: Any) -> Any:
        """Layer blocks may be written as YAML integers."""
        if isinstance(value, dict):
            return {k: ({str(b): c for b, c in v.items()} if isinstance(v, dict) else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> AtlasStep:
        if (self.coefficients is None) == (self.learn is None):
            raise ValueError("give either 'coefficients' (a mapping) or 'learn' (settings to learn them), not both or neither")
        return self


def blocks_of(view: ModelView, granularity: Granularity) -> dict[str, str]:
    """Each float tensor's block, in tensor order."""
    out = {}
    for name, recipe in view.tensors().items():
        if recipe.dtype not in FLOAT_DTYPES:
            continue
        if granularity == "tensor":
            out[name] = name
        elif granularity == "layer":
            placed = view.layout.split(name)
            out[name] = OUTSIDE if placed is None else str(placed[0])
        else:
            out[name] = module_kind(name)
    return out


def atlas(step: AtlasStep, view: ModelView, context: OpContext) -> ModelView:
    base, models = merge_inputs(step.op, [m.model for m in step.models], view, context, can_align=False)
    block_of = blocks_of(base, step.granularity)
    blocks = list(dict.fromkeys(block_of.values()))
    refs = [entry.model for entry in step.models]
    if step.coefficients is not None:
        coefficients = given_coefficients(step.coefficients, refs, blocks, step.granularity)
    else:
        assert step.learn is not None
        settings = step.learn.model_copy(update={"data": [context.data_path(spec) for spec in step.learn.data],
                                                 **({} if context.device == "auto" else {"device": context.device})})
        check_device_name(settings.device)
        key = {"step": step.model_dump(mode="json"), "device": resolve_device(settings.device), "blocks": blocks,
               "base": folder_stamp(base.source.path), "models": [folder_stamp(m.source.path) for m in models],
               "texts": [text_digest(load_text(spec).text) for spec in settings.data]}

        def learn() -> list[list[float]]:
            return learn_coefficients(base, models, block_of, blocks, settings, context.log, context.max_memory)

        learned = remembered("atlas", key, learn,
                             lambda value: isinstance(value, list) and len(value) == len(models)
                             and all(finite_numbers(row, len(blocks)) for row in value), context.log)
        coefficients = {ref: dict(zip(blocks, row)) for ref, row in zip(refs, learned)}
        context.fits.append({"granularity": step.granularity, "coefficients": coefficients})

    def update_for(name: str, shape: tuple[int, ...]) -> WeightedUpdate:
        return WeightedUpdate(tuple(coefficients[ref][block_of[name]] for ref in refs))

    return merged_view(step.op, base, [base, *models], update_for)


def given_coefficients(
    given: dict[str, float | dict[str, float]], refs: list[str], blocks: list[str], granularity: str
) -> Coefficients:
    """The plan's coefficients, complete: a number stands for every block; a mapping names each block."""
    unknown = sorted(set(given) - set(refs))
    if unknown:
        raise SurgeryError(f"atlas: coefficients name {unknown[0]!r}, which is not among the step's models ({', '.join(refs)})")
    out: Coefficients = {}
    for ref in refs:
        if ref not in given:
            raise SurgeryError(f"atlas: coefficients has no entry for {ref}; give a number or a mapping of {granularity} blocks")
        value = given[ref]
        if not isinstance(value, dict):
            out[ref] = dict.fromkeys(blocks, float(value))
            continue
        stray = sorted(set(value) - set(blocks))
        if stray:
            raise SurgeryError(f"atlas: coefficients of {ref} name block {stray[0]!r}, which granularity {granularity} "
                               f"does not have; its blocks: {', '.join(blocks[:6])}{', ...' if len(blocks) > 6 else ''}")
        missing = [b for b in blocks if b not in value]
        if missing:
            raise SurgeryError(f"atlas: coefficients of {ref} lack block {missing[0]!r} ({len(missing)} missing); "
                               "give every block, or one number for all")
        out[ref] = {b: float(value[b]) for b in blocks}
    return out


OP = Op("atlas", AtlasStep, atlas, lambda step: describe_models(step.op, step.models),
        'Zhang et al. 2024, "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling"',
        {"op": "atlas", "models": ["./prose", "./code"], "granularity": "layer",
         "learn": {"data": "builtin:mixed-dev"}})
