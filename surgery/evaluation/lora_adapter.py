"""A PEFT LoRA adapter beside a standard model (`heal` with `adapter.write: peft`) applied when surgery loads
the folder, so `surgery eval` scores the model the adapter makes whether or not peft is installed (with
peft, transformers applies it itself while loading, and this leaves the model alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.evaluation.recursive_model import add_low_rank

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def apply_lora_adapter(model: Any, folder: Path) -> Any:
    """`model` with the folder's plain LoRA adapter added (weight + (alpha / r) B A per target module)."""
    from safetensors.torch import load_file

    if not (folder / CONFIG).is_file() or getattr(model, "_hf_peft_config_loaded", False):
        return model
    try:
        config = json.loads((folder / CONFIG).read_text())
        weights = load_file(folder / WEIGHTS)
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{folder / CONFIG}: a LoRA adapter surgery cannot read ({e})") from None
    unsupported = [k for k in ("use_dora", "use_rslora", "modules_to_save") if config.get(k)]
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise SurgeryError(f"{folder / CONFIG}: surgery applies plain LoRA adapters only; pip install peft to load this "
                           "one with transformers")
    dtype = next(model.parameters()).dtype
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module_name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        try:
            module = model.get_submodule(module_name)
            lora_b = weights[key.replace(".lora_A.", ".lora_B.")]
        except (AttributeError, KeyError):
            raise SurgeryError(f"{folder / WEIGHTS}: {key} names no module of the model (or lacks its lora_B)") from None
        rank = config.get("rank_pattern", {}).get(module_name, config["r"])
        scale = config.get("alpha_pattern", {}).get(module_name, config["lora_alpha"]) / rank
        lora_a = weights[key]
        conv1d = type(module).__name__ == "Conv1D"
        b, a = (lora_a.T, lora_b.T) if conv1d else (lora_b, lora_a)
        device = module.weight.device
        add_low_rank(module, _frozen(b, dtype, device), _frozen(a, dtype, device), scale)
    return model


def _frozen(tensor: Any, dtype: Any, device: Any) -> Any:
    import torch

    return torch.nn.Parameter(tensor.contiguous().to(device, dtype), requires_grad=False)
