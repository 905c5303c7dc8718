"""`surgery inspect`: what a checkpoint holds, from its headers: architecture, layers, tensor groups, dtypes, sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from surgery.checkpoint.layout import Layout, find_layout, language_model_path, layer_count, stack_name, stacks
from surgery.checkpoint.reader import FLOAT_DTYPES, Checkpoint, numel, read_config
from surgery.formats.ensemble_folder import is_ensemble
from surgery.formats.ensemble_folder import read_spec as read_spec_of_ensemble
from surgery.formats.recursive import is_compact, read_spec


def inspect_ensemble(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """An ensemble folder (`ensemble` op): its members (by reference, or stored in it), weights and rule."""
    spec = read_spec_of_ensemble(folder, config)
    members = []
    for index, member in enumerate(spec.members):
        count = layer_count(member.config, language_model_path(member.config))[1]
        members.append({"index": index, "path": member.path, "architecture": (member.config.get("architectures") or [None])[0],
                        "model_type": member.config.get("model_type"), "layers": count, "weight": spec.weights[index]})
    stored = sorted(p.name for p in folder.glob("*.safetensors"))
    return {"path": str(folder), "architecture": None, "model_type": config.get("model_type"),
            "ensemble": {"combine": spec.combine, "layout": spec.layout, "members": members}, "shards": stored}


def inspect(model: str | Path) -> dict[str, Any]:
    """What a checkpoint holds, from its headers alone.

    Args: `model` is a model folder. Returns a JSON-ready dict (what `surgery inspect --json` prints):
    architecture, layers, parameters, bytes, dtypes, shards; `layer_groups` lists each layer tensor
    once, with the layers that have it; `stacks` lists every layer stack (a VLM's language model and
    vision tower, an encoder and a decoder), `edited` marking the one plans edit. For a compact recursive checkpoint the layers are its shared
    slots, and `recursive` says how they loop. Raises SurgeryError for a folder that is not a model.
    """
    folder = Path(model)
    config = read_config(folder) if folder.is_dir() and (folder / "config.json").exists() else {}
    if is_ensemble(config):
        return inspect_ensemble(folder, config)
    checkpoint = Checkpoint.open(model)
    config, recursive = checkpoint.config, None
    if is_compact(config):
        spec, config = read_spec(checkpoint)
        layout = Layout(spec.layer_prefix, spec.slots, layer_count(config)[0])
        recursive = spec.to_dict()
    else:
        layout = find_layout(config, checkpoint.tensors, where=str(checkpoint.path))
    outside_tensors, layers = layout.group(checkpoint.tensors)
    outside = [{"name": n, "dtype": i.dtype, "shape": list(i.shape), "bytes": i.nbytes} for n, i in outside_tensors.items()]
    groups: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for suffix, info in layer.items():
            group = groups.setdefault(suffix, {"suffix": suffix, "dtype": info.dtype, "shape": list(info.shape),
                                               "layers": 0, "bytes": 0})
            group["layers"] += 1
            group["bytes"] += info.nbytes
    # integer tensors are buffers (position ids, masks), not parameters
    parameters = sum(numel(info.shape) for info in checkpoint.tensors.values() if info.dtype in FLOAT_DTYPES)
    return {
        "path": str(checkpoint.path),
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "layers": layout.num_layers,
        "layer_prefix": layout.prefix,
        "layer_count_key": ".".join((*layout.config_path, layout.count_key)),
        "stacks": [{"name": stack_name(s), "prefix": s.prefix, "layers": s.num_layers,
                    "count_key": ".".join((*s.config_path, s.count_key)), "edited": s.prefix == layout.prefix}
                   for s in stacks(config, checkpoint.tensors)],
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "parameters": parameters,
        "bytes": checkpoint.total_bytes,
        "dtypes": dict(Counter(info.dtype for info in checkpoint.tensors.values())),
        "tensors": len(checkpoint.tensors),
        "layer_groups": sorted(groups.values(), key=lambda g: g["suffix"]),
        "outside_layers": sorted(outside, key=lambda t: t["name"]),
        **({"recursive": recursive} if recursive else {}),
        "shards": [
            {"file": s.path.name, "tensors": len(s.tensors), "bytes": sum(t.nbytes for t in s.tensors.values())}
            for s in checkpoint.shards
        ],
    }

