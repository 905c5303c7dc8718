"""Load a compact recursive checkpoint as a transformers module whose tied weights are shared.

Parameters are shared, modules are not: every depth keeps its own layer module (its own
`layer_idx`, so its own KV-cache slot), and the depths of one slot hold the same Parameter
objects. A relaxed matrix adds its depth's low-rank term through a forward hook: x B A for
Conv1D's (in, out) weights, x A^T B^T for Linear's (out, in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.checkpoint.config import per_layer_values, rewrite_config
from surgery.checkpoint.layout import layer_count
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.evaluation.models import layer_modules, require_causal_lm
from surgery.evaluation.parameters import is_offloaded
from surgery.formats.recursive import CompactSpec, depth_name, lora_names, read_spec


def load_compact(folder: Path, device: str, dtype: Any) -> Any:
    """The K shared layers and the tensors outside the layers load as a K-layer model through
    transformers (its own key renames and head tying apply); an L-layer model built without
    initialising its weights then takes those Parameters, slot by slot, at every depth."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Checkpoint.open(folder)
    spec, base = read_spec(checkpoint)
    require_causal_lm(base, folder)
    count_key, depths = layer_count(base)
    configs = per_layer_values(base, depths, folder)
    first_depth = [spec.loop_map.index(slot) for slot in range(spec.slots)]
    slots_config = rewrite_config(base, count_key, [configs[d] for d in first_depth])
    shared = AutoModelForCausalLM.from_pretrained(folder, config=AutoConfig.for_model(**slots_config), dtype=dtype)
    with _no_init_weights():  # placeholders, never touched (so never resident), replaced below
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**base))
    shared_layers, layers = layer_modules(shared, spec.layer_prefix, spec.slots), layer_modules(model, spec.layer_prefix, depths)
    shared_params = dict(shared.named_parameters(remove_duplicate=False))
    layer_path = _path_of(model, layers)
    for name in [n for n, _ in model.named_parameters(remove_duplicate=False) if not n.startswith(layer_path + ".")]:
        _put(model, name, shared_params[name])
    for depth, slot in enumerate(spec.loop_map):
        for name, param in shared_layers[slot].named_parameters():
            _put(layers[depth], name, param)

    def stored(name: str) -> torch.nn.Parameter:
        info = checkpoint.tensors[name]
        with safe_open(info.file, framework="pt") as f:
            return torch.nn.Parameter(f.get_tensor(name).to(dtype), requires_grad=False)

    for depth in range(depths):
        for suffix in spec.per_depth:
            _put(layers[depth], suffix, stored(depth_name(depth, suffix)))
        for suffix in spec.ranks:
            b, a = (stored(n) for n in lora_names(depth, suffix))
            add_low_rank(layers[depth].get_submodule(suffix.removesuffix(".weight")), b, a)
    return model.to(device).eval()


def _path_of(model: Any, module: Any) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _put(root: Any, name: str, param: Any) -> None:
    module_name, _, leaf = name.rpartition(".")
    (root.get_submodule(module_name) if module_name else root).register_parameter(leaf, param)


def stored_parameters(model: Any, spec: CompactSpec) -> dict[str, Any]:
    """Each tensor of the compact checkpoint by its stored name -> the Parameter `load_compact` made of it
    (a shared slot's tensor once: its depths hold that one Parameter), so training it trains every depth."""
    layers = layer_modules(model, spec.layer_prefix, len(spec.loop_map))
    layer_path = _path_of(model, layers)
    out = {name: p for name, p in model.named_parameters() if not name.startswith(layer_path + ".")}
    for depth, slot in enumerate(spec.loop_map):
        for name, param in layers[depth].named_parameters(remove_duplicate=False):
            module, _, leaf = name.rpartition(".")
            if leaf in ("lora_B", "lora_A"):
                out[depth_name(depth, f"{module}.{leaf}.weight")] = param
            elif name in spec.per_depth:
                out[depth_name(depth, name)] = param
            else:
                out.setdefault(f"{spec.layer_prefix}.{slot}.{name}", param)
    return out


class LowRankDelta:
    """The forward hook adding `scale` B A to a linear's output (a depth's relaxation, a heal's adapter)."""

    def __init__(self, b: Any, a: Any, conv1d: bool, scale: float = 1.0) -> None:
        self.b, self.a, self.conv1d, self.scale = b, a, conv1d, scale

    def __call__(self, module: Any, args: tuple[Any, ...], output: Any) -> Any:
        x = args[0]
        delta = (x @ self.b) @ self.a if self.conv1d else (x @ self.a.T) @ self.b.T
        return output + (delta if self.scale == 1.0 else self.scale * delta)


def add_low_rank(module: Any, b: Any, a: Any, scale: float = 1.0) -> None:
    """`module` (Linear or transformers' Conv1D) computes with weight + scale B A, in its stored layout
    (out, in) or (in, out), B and A registered on it as `lora_B` and `lora_A`."""
    import torch

    conv1d = type(module).__name__ == "Conv1D"  # transformers' GPT-2 style linear, weight (in, out)
    if not conv1d and not isinstance(module, torch.nn.Linear):
        raise SurgeryError(f"cannot apply a LoRA to a {type(module).__name__}; only Linear and Conv1D modules")
    # registered as parameters so they count, move with .to() and show in state_dict; not on a module whose
    # weights a memory cap offloads, where accelerate would replace them from its own store at every forward
    if not is_offloaded(module):
        module.register_parameter("lora_B", b)
        module.register_parameter("lora_A", a)
    module.register_forward_hook(LowRankDelta(b, a, conv1d, scale))


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
