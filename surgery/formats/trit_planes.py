"""The packed trit-plane checkpoint `ptqtp` writes: each quantized matrix as its two trit-planes packed
five trits to a byte and its scales, every other tensor as it was.

config.json names model type `surgery_trit_planes`, so plain transformers refuses the folder with a clear
error rather than loading it with random weights where the matrices are missing. The original config sits
under `base_config`, and `surgery_trit_planes` lists the modules and the group size:

    {module}.trits_1, {module}.trits_2       uint8 (rows, ceil(columns / 5)), compute.trits.pack_trits
    {module}.trit_scales                     (rows, columns / group, 2) in the source dtype

Opened as a view it is its dense model (each matrix a1 t1 + a2 t2), so `surgery eval` and any plan
read it; `materialize` writes that dense model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from surgery.checkpoint.reader import Checkpoint
from surgery.compute.trits import FromTrits
from surgery.errors import SurgeryError
from surgery.formats.own_config import own_section
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import ModelView, standard_view

MODEL_TYPE = "surgery_trit_planes"
SECTION = "surgery_trit_planes"
FORMAT_VERSION = 1
PARTS = ("trits_1", "trits_2", "trit_scales")


def is_trit_planes(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def trit_config(base_config: dict[str, Any], modules: list[str], group_size: int) -> dict[str, Any]:
    architectures = [f"SurgeryTritPlanes{a}" for a in base_config.get("architectures") or []]
    section = {"format_version": FORMAT_VERSION, "group_size": group_size, "modules": sorted(modules)}
    return {"model_type": MODEL_TYPE, "architectures": architectures, SECTION: section, "base_config": base_config}


def trit_view(checkpoint: Checkpoint, label: str) -> ModelView:
    """The dense model a trit-plane checkpoint stands for: each listed module's weight computed from its
    planes and scales, every other tensor copied."""
    where = checkpoint.path / "config.json"
    section, base = own_section(checkpoint, SECTION, FORMAT_VERSION, "trit-plane")
    try:
        modules, group = [str(m) for m in section["modules"]], int(section["group_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise SurgeryError(f"{where}: not a valid trit-plane config (bad or missing {e})") from None
    recipes = {name: TensorRecipe.copy_of(info) for name, info in checkpoint.tensors.items()}
    for module in modules:
        try:
            one, two, scales = (checkpoint.tensors[f"{module}.{part}"] for part in PARTS)
        except KeyError as e:
            raise SurgeryError(f"{checkpoint.path}: trit-plane checkpoint lacks tensor {e}") from None
        rows, columns = scales.shape[0], scales.shape[1] * group
        if one.shape != two.shape or one.shape != (rows, -(-columns // 5)) or scales.shape[2:] != (2,):
            raise SurgeryError(f"{checkpoint.path}: {module}'s trit-planes and scales do not fit one matrix")
        for part in PARTS:
            del recipes[f"{module}.{part}"]
        recipes[f"{module}.weight"] = TensorRecipe.computed(
            scales.dtype, (rows, columns), tuple(TensorRecipe.copy_of(i) for i in (one, two, scales)),
            FromTrits(columns, scales.dtype))
    return standard_view(replace(checkpoint, config=base), label, recipes=recipes)
