"""The compact recursive checkpoint: K shared layers stored once, per-depth LoRA factors and vectors,
and the loop map, so a tied model takes about K/L of its layers' bytes on disk.

config.json names model type `surgery_recursive`, so plain transformers refuses the folder with a
clear error rather than loading K layers as if they were the model. The original config, with all
L depths, sits under `base_config`, and `surgery_recursive` says how to rebuild each depth:

    {prefix}.{s}.{suffix}                    shared slot s (the model's own layer names, s < K)
    depths.{l}.{suffix}                      a tensor kept per depth (norm weights, biases)
    depths.{l}.{module}.lora_B.weight        B_l (out x r) and A_l (r x in) of a relaxed matrix,
    depths.{l}.{module}.lora_A.weight        so depth l's weight is shared + B_l A_l

Opened as a view, a compact checkpoint is its materialized L-layer model, so any plan (and
`surgery materialize`) can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from surgery.checkpoint.config import per_layer_values
from surgery.checkpoint.layout import Layout, layer_count
from surgery.checkpoint.reader import Checkpoint
from surgery.compute.lowrank import LowRankSum
from surgery.errors import SurgeryError
from surgery.formats.own_config import own_section
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import Layer, LayerOrigin, ModelView

MODEL_TYPE = "surgery_recursive"
SECTION = "surgery_recursive"
FORMAT_VERSION = 1


def depth_name(depth: int, suffix: str) -> str:
    return f"depths.{depth}.{suffix}"


def lora_names(depth: int, suffix: str) -> tuple[str, str]:
    """Names of B and A for a relaxed matrix `{module}.weight`."""
    module = suffix.removesuffix(".weight")
    return depth_name(depth, f"{module}.lora_B.weight"), depth_name(depth, f"{module}.lora_A.weight")


def is_compact(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


@dataclass(frozen=True)
class CompactSpec:
    """The `surgery_recursive` section: how each depth is rebuilt from the stored tensors."""

    layer_prefix: str
    loop_map: tuple[int, ...]  # depth -> shared slot
    per_depth: frozenset[str]  # suffixes stored per depth
    ranks: dict[str, int]  # relaxed suffix -> LoRA rank

    @property
    def slots(self) -> int:
        return max(self.loop_map) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "layer_prefix": self.layer_prefix, "loop_map": list(self.loop_map),
                "per_depth": sorted(self.per_depth), "relaxed": dict(sorted(self.ranks.items()))}


def compact_config(base_config: dict[str, Any], spec: CompactSpec) -> dict[str, Any]:
    architectures = [f"SurgeryRecursive{a}" for a in base_config.get("architectures") or []]
    return {"model_type": MODEL_TYPE, "architectures": architectures, SECTION: spec.to_dict(), "base_config": base_config}


def spec_of(section: dict[str, Any]) -> CompactSpec:
    """The spec a `surgery_recursive` section (as `to_dict` writes it) describes."""
    return CompactSpec(section["layer_prefix"], tuple(int(s) for s in section["loop_map"]),
                       frozenset(section["per_depth"]), {k: int(v) for k, v in section["relaxed"].items()})


def read_spec(checkpoint: Checkpoint) -> tuple[CompactSpec, dict[str, Any]]:
    """The spec and base config of a compact checkpoint, checked against its tensors."""
    where = checkpoint.path / "config.json"
    section, base = own_section(checkpoint, SECTION, FORMAT_VERSION, "compact recursive")
    try:
        spec = spec_of(section)
    except (KeyError, TypeError, ValueError) as e:
        raise SurgeryError(f"{where}: not a valid compact recursive config (bad or missing {e})") from None
    if layer_count(base)[1] != len(spec.loop_map) or sorted(set(spec.loop_map)) != list(range(spec.slots)):
        raise SurgeryError(f"{where}: loop_map does not cover the base config's layers with slots 0..K-1")
    for name in _required_names(spec):
        if name not in checkpoint.tensors:
            raise SurgeryError(f"{checkpoint.path}: compact checkpoint lacks tensor {name!r}")
    return spec, base


def _required_names(spec: CompactSpec) -> list[str]:
    names = []
    for depth in range(len(spec.loop_map)):
        names += [depth_name(depth, s) for s in sorted(spec.per_depth)]
        for suffix in spec.ranks:
            names += lora_names(depth, suffix)
    return names


def compact_view(checkpoint: Checkpoint, label: str) -> ModelView:
    """The L-layer model a compact checkpoint stands for: shared tensors copied to every depth that
    uses them, per-depth tensors copied, relaxed matrices computed as shared + B A."""
    spec, base = read_spec(checkpoint)
    stored = {name: TensorRecipe.copy_of(info) for name, info in checkpoint.tensors.items()}
    outside, layers = depth_layers(spec, base, stored, label, checkpoint.path)
    count_key, depths = layer_count(base)
    layout = Layout(prefix=spec.layer_prefix, num_layers=depths, count_key=count_key)
    source = replace(checkpoint, config=base)
    return ModelView(source=source, layout=layout, outside=outside, layers=tuple(layers), label=label)


def depth_layers(spec: CompactSpec, base: dict[str, Any], stored: dict[str, TensorRecipe], label: str,
                 where: Any) -> tuple[dict[str, TensorRecipe], list[Layer]]:
    """The tensors outside the layers and the L depths a compact model's stored tensors (as recipes: a
    checkpoint's, or a heal's trained ones) stand for."""
    count_key, depths = layer_count(base)
    slot_layout = Layout(prefix=spec.layer_prefix, num_layers=spec.slots, count_key=count_key)
    outside, slots = slot_layout.group(stored)
    outside = {n: r for n, r in outside.items() if not n.startswith("depths.")}
    configs = per_layer_values(base, depths, where)
    layers = []
    for depth, slot in enumerate(spec.loop_map):
        tensors: dict[str, TensorRecipe] = {}
        for suffix in sorted(set(slots[slot]) | spec.per_depth):
            if suffix in spec.per_depth:
                tensors[suffix] = stored[depth_name(depth, suffix)]
            elif suffix in spec.ranks:
                shared = slots[slot][suffix]
                factors = tuple(stored[n] for n in lora_names(depth, suffix))
                tensors[suffix] = TensorRecipe.computed(shared.dtype, shared.shape, (shared, *factors), LowRankSum())
            else:
                tensors[suffix] = slots[slot][suffix]
        origin = LayerOrigin(label, depth, (f"slot {slot}",))
        layers.append(Layer(tensors=tensors, config=configs[depth], origin=origin))
    return outside, layers
