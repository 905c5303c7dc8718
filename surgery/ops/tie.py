"""`tie`: an L-layer model as K shared layers looped to depth L (Recursive Transformers), optionally
relaxed by per-depth LoRA made from the SVD of each depth's residual (Bae et al. 2024).

Slots: `loops: B` gives K = L / B slots, depth l using slot l mod K (cycle) or l div B (sequence);
`block` lists the layers of each slot. A slot's weights are the mean of its source layers:
- average: the layers tied to it;
- stepwise: the layer at round(linspace(0, L-1, K))[s];
- lower: layer s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from surgery.checkpoint.modules import is_expert, is_router
from surgery.checkpoint.reader import FLOAT_DTYPES
from surgery.compute.lowrank import Mean, ResidualFactors, SvdCache
from surgery.errors import SurgeryError
from surgery.formats.recursive import CompactSpec, compact_config, depth_name, lora_names
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel, Strict, nonempty_list, parse_layers
from surgery.ops.registry import Op
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import Layer, ModelView, Storage


class RelaxSettings(Strict):
    """Per-depth low-rank corrections of the shared weights (Relaxed Recursive Transformers)."""

    rank: int | Literal["full"] = Field(default=16, description="LoRA rank r (capped at min(out, in)), or full.")
    modules: list[str] | None = Field(
        default=None, description="Linear modules relaxed, e.g. [q_proj, down_proj]; default every matrix of a "
        "layer but an MoE expert's or router's (those are shared unrelaxed)."
    )
    vectors: Literal["per_depth", "shared"] = Field(
        default="per_depth", description="Norm weights and biases: kept per depth (default) or tied like the matrices."
    )

    @field_validator("rank", mode="before")
    @classmethod
    def _at_least_one(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"rank {value} is below 1; leave 'relax' out for a strictly recursive model")
        return value


class TieStep(StepModel):
    """Layer tying: K shared layers looped to the original depth, optionally relaxed per depth by LoRA."""

    op: Literal["tie"]
    loops: int | None = Field(default=None, ge=1, description="B: how many times the shared block repeats (L/B slots).")
    strategy: Literal["cycle", "sequence"] = Field(
        default="cycle", description="cycle: depth l uses slot l mod K; sequence: slot l div B."
    )
    block: list[list[int]] | None = Field(
        default=None, description="Instead of loops: the layers tied into each shared slot, e.g. [[0, 3], [1, 4], [2, 5]]."
    )
    init: Literal["average", "stepwise", "lower"] = "average"
    relax: RelaxSettings | None = None
    format: Literal["compact", "materialized"] = "compact"

    @field_validator("block", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        return None if value is None else [parse_layers(group) for group in nonempty_list(value)]

    @model_validator(mode="after")
    def _one_map(self) -> TieStep:
        if (self.loops is None) == (self.block is None):
            raise ValueError("give either 'loops' (how many times the shared block repeats) or 'block' (the layers "
                             "tied into each slot), not both or neither")
        return self

    def storage_format(self) -> tuple[str, str] | None:
        return ("compact", "materialized") if self.format == "compact" else None


def tie(step: TieStep, view: ModelView, context: OpContext) -> ModelView:
    if step.format == "compact" and view.layout.config_path:
        where = ".".join((*view.layout.config_path, view.layout.count_key))
        raise SurgeryError(f"tie: the compact format needs the layer count at the top of config.json, but this model "
                           f"counts its layers in {where} (a vision-language model); use format: materialized")
    depths = len(view.layers)
    groups = slot_groups(step, depths)
    loop_map = [0] * depths
    for slot, members in enumerate(groups):
        for depth in members:
            loop_map[depth] = slot
    sources = init_sources(step.init, groups, depths)
    reference = _check_tieable(view)
    ranks = relaxed_ranks(step.relax, reference, context)
    per_depth = {s for s, r in reference.tensors.items() if len(r.shape) < 2} \
        if step.relax is not None and step.relax.vectors == "per_depth" else set()

    def source_inputs(slot: int, suffix: str) -> tuple[TensorRecipe, ...]:
        return tuple(view.layers[i].tensors[suffix] for i in sources[slot])

    def shared(slot: int, suffix: str) -> TensorRecipe:
        inputs, recipe = source_inputs(slot, suffix), reference.tensors[suffix]
        if len(inputs) == 1 or recipe.dtype not in FLOAT_DTYPES:
            return inputs[0]
        return TensorRecipe.computed(recipe.dtype, recipe.shape, inputs, Mean())

    layers = []
    for depth, layer in enumerate(view.layers):
        slot, tensors = loop_map[depth], {}
        for suffix, recipe in layer.tensors.items():
            if suffix in per_depth:
                tensors[suffix] = recipe
            elif suffix in ranks:
                inputs = (recipe, *source_inputs(slot, suffix))
                tensors[suffix] = TensorRecipe.computed(recipe.dtype, recipe.shape, inputs,
                                                        ResidualFactors(ranks[suffix], recipe.dtype))
            else:
                tensors[suffix] = shared(slot, suffix)
        edit = f"tied(slot {slot}{', relaxed' if ranks else ''})"
        layers.append(Layer(tensors=tensors, config=layer.config, origin=layer.origin.edited(edit)))
    materialized = view.with_layers(layers)
    if step.format == "materialized":
        return materialized

    compact = dict(view.outside)
    for slot in range(len(groups)):
        for suffix in reference.tensors:
            if suffix not in per_depth:
                compact[view.layout.layer_name(slot, suffix)] = shared(slot, suffix)
    for depth, layer in enumerate(view.layers):
        for suffix in sorted(per_depth):
            compact[depth_name(depth, suffix)] = layer.tensors[suffix]
        for suffix, rank in ranks.items():
            matrix = layer.tensors[suffix]
            inputs, cache = (matrix, *source_inputs(loop_map[depth], suffix)), SvdCache()
            b_name, a_name = lora_names(depth, suffix)
            compact[b_name] = TensorRecipe.computed(matrix.dtype, (matrix.shape[0], rank), inputs,
                                                    ResidualFactors(rank, matrix.dtype, "B", cache))
            compact[a_name] = TensorRecipe.computed(matrix.dtype, (rank, matrix.shape[1]), inputs,
                                                    ResidualFactors(rank, matrix.dtype, "A", cache))
    spec = CompactSpec(view.layout.prefix, tuple(loop_map), frozenset(per_depth), ranks)
    return replace(materialized, storage=Storage(compact, compact_config(materialized.config(), spec)))


def slot_groups(step: TieStep, depths: int) -> list[list[int]]:
    """The depths tied into each slot, from `loops` and `strategy` or from `block`."""
    if step.block is not None:
        seen = sorted(d for group in step.block for d in group)
        if seen != list(range(depths)):
            missing = sorted(set(range(depths)) - set(seen))
            repeated = sorted({d for d in seen if seen.count(d) > 1})
            outside = sorted(d for d in seen if d >= depths)
            problem = (f"layer {outside[0]} does not exist (the model has {depths}: 0-{depths - 1})" if outside else
                       f"layer {repeated[0]} is in two slots" if repeated else f"layer {missing[0]} is in no slot")
            raise SurgeryError(f"tie: block must place every layer in exactly one slot: {problem}")
        return [list(group) for group in step.block]
    assert step.loops is not None
    if depths % step.loops:
        divisors = [b for b in range(1, depths + 1) if depths % b == 0]
        raise SurgeryError(
            f"tie: {depths} layers do not split into {step.loops} loops; use loops that divide {depths} "
            f"({', '.join(map(str, divisors))}) or list each slot's layers with 'block'"
        )
    slots = depths // step.loops
    if step.strategy == "cycle":
        return [list(range(s, depths, slots)) for s in range(slots)]
    return [list(range(s * step.loops, (s + 1) * step.loops)) for s in range(slots)]


def init_sources(init: str, groups: list[list[int]], depths: int) -> list[list[int]]:
    """The layers each slot's weights are the mean of."""
    slots = len(groups)
    if init == "average":
        return groups
    if init == "lower":
        return [[s] for s in range(slots)]
    # stepwise: round(linspace(0, L-1, K)), rounding half to even like numpy
    return [[round(s * (depths - 1) / (slots - 1)) if slots > 1 else 0] for s in range(slots)]


def relaxed_ranks(relax: RelaxSettings | None, layer: Layer, context: OpContext) -> dict[str, int]:
    """Relaxed matrix suffix -> rank, the requested rank capped at min(out, in) (capping is reported)."""
    if relax is None:
        return {}
    everything = layer.matrices()
    # MoE experts and routers stay shared: transformers loads them as fused or router modules, not
    # linear ones, so there is no linear for a depth's B A to attach to (the attention is relaxed).
    matrices = {s: r for s, r in everything.items() if not is_expert(s) and not is_router(s)}
    if relax.modules is None:
        chosen = sorted(matrices)
    else:
        chosen = []
        for module in relax.modules:
            matched = [s for s in matrices if f".{module}." in f".{s}"]
            if not matched and any(f".{module}." in f".{s}" for s in everything):
                raise SurgeryError(f"tie: relax module {module!r} is an MoE expert or router; those are shared "
                                   "unrelaxed (transformers loads them as fused modules); relax the attention instead")
            if not matched:
                names = sorted({s.removesuffix(".weight").split(".")[-1] for s in matrices})
                raise SurgeryError(f"tie: relax module {module!r} matches no matrix of the layers; matrices there: "
                                   f"{', '.join(names)}")
            chosen += [s for s in sorted(matched) if s not in chosen]
    ranks = {}
    for suffix in chosen:
        if not suffix.endswith(".weight"):
            raise SurgeryError(f"tie: cannot relax {suffix}: only the weight of a linear module takes a LoRA")
        cap = min(matrices[suffix].shape)
        ranks[suffix] = cap if relax.rank == "full" else min(relax.rank, cap)
        if relax.rank != "full" and relax.rank > cap:
            context.log(f"tie: rank {relax.rank} capped to {cap} for {suffix} (shape {list(matrices[suffix].shape)})")
    context.fits.append({"ranks": ranks})
    return ranks


def _check_tieable(view: ModelView) -> Layer:
    """Layers that share weights must have one set of tensors, shapes and dtypes, read straight from a checkpoint."""
    reference = view.layers[0]
    signature = {s: (r.dtype, r.shape) for s, r in reference.tensors.items()}
    for index, layer in enumerate(view.layers):
        for suffix, recipe in layer.tensors.items():
            if recipe.compute is not None:
                raise SurgeryError(
                    f"tie: layer {index}'s {suffix} is computed by an earlier step; put tie first, or apply the "
                    "earlier steps to a checkpoint and tie that"
                )
            if signature.get(suffix) != (recipe.dtype, recipe.shape):
                raise SurgeryError(
                    f"tie: layer {index} has {suffix} {recipe.dtype}{list(recipe.shape)} unlike layer 0; "
                    "only layers of one shape can share weights"
                )
        if set(layer.tensors) != set(signature):
            missing = sorted(set(signature) - set(layer.tensors))
            raise SurgeryError(f"tie: layer {index} lacks {missing[0]}; only layers of one shape can share weights")
    return reference


def describe(step: TieStep) -> str:
    slots = f"{step.loops} loops ({step.strategy})" if step.loops else "explicit slots"
    relaxed = f", relaxed by per-depth LoRA of rank {step.relax.rank}" if step.relax else ""
    return (f"Layers tied into shared ones looped {slots}, initialised by `{step.init}`{relaxed}, "
            f"written `{step.format}` (`tie`).")


OP = Op("tie", TieStep, tie, describe,
        'Bae et al. 2024, "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA"',
        {"op": "tie", "loops": 2, "relax": {"rank": 16}})
