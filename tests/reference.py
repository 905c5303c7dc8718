"""Independent in-memory surgery on transformers modules: the reference the tool must equal."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModel, AutoModelForCausalLM


def load(folder, encoder: bool = False):
    auto = AutoModel if encoder else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32).eval()


def layer_list(model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """The ModuleList holding the decoder/encoder layers: the one as long as the layer count."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise AssertionError("no layer list found")


def chain_in_memory(model, picks, scales=None):
    """A new model whose layers are deep copies of picks = [(source_model, index), ...].

    Per-layer config lists (any list as long as the layer count) are re-indexed the same way;
    `scales` maps an output position to {module name: factor} applied to that layer's tensors.
    """
    new = copy.deepcopy(model)
    parent, attr, _ = layer_list(new)
    layers = []
    for position, (source, index) in enumerate(picks):
        layer = copy.deepcopy(layer_list(source)[2][index])
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
        for module_name, factor in (scales or {}).get(position, {}).items():
            with torch.no_grad():
                for name, param in layer.named_parameters():
                    if f".{module_name}." in f".{name}.":
                        param.copy_((param.float() * factor).to(param.dtype))
        layers.append(layer)
    setattr(parent, attr, torch.nn.ModuleList(layers))
    count = model.config.num_hidden_layers
    indices = [index for _, index in picks]
    for key, value in list(vars(new.config).items()):
        if isinstance(value, list) and len(value) == count:
            setattr(new.config, key, [value[i] for i in indices])
    new.config.num_hidden_layers = len(picks)
    return new


def outputs(model, ids: torch.Tensor, encoder: bool = False) -> torch.Tensor:
    """Logits of a causal LM (cache off: every layer computes afresh), last hidden state of an encoder."""
    with torch.no_grad():
        if encoder:
            return model(input_ids=ids).last_hidden_state
        return model(input_ids=ids, use_cache=False).logits


def tie_in_memory(model, sources: list[list[int]], loop_map: list[int], per_depth: tuple[str, ...] = ()):
    """A copy of `model` whose layer l holds the mean of layers sources[loop_map[l]] (in float64),
    except parameters whose name contains one of `per_depth`, which keep their own values."""
    new = copy.deepcopy(model)
    originals = layer_list(model)[2]
    with torch.no_grad():
        for depth, layer in enumerate(layer_list(new)[2]):
            for name, param in layer.named_parameters():
                if any(key in name for key in per_depth):
                    continue
                stack = [originals[i].get_parameter(name).double() for i in sources[loop_map[depth]]]
                param.copy_(torch.stack(stack).mean(0).to(param.dtype))
    return new
