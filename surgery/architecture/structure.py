"""The output model's structure, checked against transformers' own classes before anything is written.

transformers builds a model's layers from its config: a dense or MoE MLP, attention or Mamba, a
sliding or full window, by per-layer lists and rules. An edit that moves layers must leave every
output position built as its source layer was, and every written tensor where transformers loads
it. Both are checked on the meta device (no memory): the output model is built from the rewritten
config, the tensors the plan writes are put through transformers' own loading (its renames and
expert fusing included), and each output layer's module tree is compared with its source layer's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from surgery.errors import SurgeryError

Shapes = Mapping[str, tuple[int, ...]]
# Module attributes that say where a layer sits (the KV-cache slot) or copy the model's layer count, not
# what the layer computes; what is derived from them is a setting or buffer of its own and is compared.
# The architecture tests compare logits for every model type, so a forward that used them would show.
POSITION_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "idx",
                                 "num_hidden_layers", "num_layers", "n_layers"})
_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Problem:
    """One way transformers would load the output differently from what the plan says."""

    kind: str  # missing | unexpected | mismatched
    name: str
    detail: str = ""


def model_class(config: Mapping[str, Any]) -> type | None:
    """The transformers class that loads this config: its `architectures` entry, else the causal-LM
    class of its model type; None for an architecture transformers does not ship."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    return getattr(transformers, name, None) if name else None


def config_object(config: Mapping[str, Any]) -> Any:
    """transformers' config object for a config.json dict; its own validation errors become one line."""
    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[config["model_type"]]
        return cls.from_dict(cls._decode_special_floats(dict(config)))  # as from_pretrained reads config.json
    except Exception as e:  # noqa: BLE001 - any validator's complaint is the reason
        raise SurgeryError(f"transformers rejects the output config: {_first_line(e)}") from None


def build_on_meta(cls: type, config: Any) -> Any:
    """The model transformers builds for `config`, with no memory behind its tensors; where its own
    code fails on the config (a rule the edit broke), one line saying so."""
    import torch

    try:
        with torch.device("meta"):
            return cls._from_config(config)
    except Exception as e:  # noqa: BLE001 - whatever the model's constructor raises is the reason
        raise SurgeryError(f"transformers cannot build {cls.__name__} from the output config: {_first_line(e)}") from None


def stored_transposed(config: Mapping[str, Any], names: Iterable[str]) -> dict[str, bool | None]:
    """Whether transformers stores each weight as (input, output), the transpose of a linear layer's: fused
    3-D experts as their module says (gpt-oss), GPT-2's Conv1D always, nn.Linear never; None where the
    module does not say (no such module, or one of another kind)."""
    import torch

    names = list(names)
    cls = model_class(config)
    if cls is None or not names:
        return dict.fromkeys(names)
    model = build_on_meta(cls, config_object(config))
    found: dict[str, bool | None] = {}
    for name in names:
        try:
            module = model.get_submodule(name.rpartition(".")[0])
        except AttributeError:
            module = None
        transposed = getattr(module, "is_transposed", None)
        if type(module).__name__ == "Conv1D":
            transposed = True
        elif isinstance(module, torch.nn.Linear):
            transposed = False
        found[name] = transposed if isinstance(transposed, bool) else None
    return found


def loading_problems(model: Any, shapes: Shapes) -> set[Problem]:
    """What transformers reports loading tensors of these names and shapes into `model`: missing,
    unexpected and mismatched keys, after its checkpoint renames and expert fusing."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    load_config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model, None, None),
                                      device_map={"": "meta"})
    info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=state, load_config=load_config)
    model._adjust_missing_and_unexpected_keys(info)  # tied weights and keys each class says to ignore
    problems = {Problem("missing", name) for name in info.missing_keys}
    problems |= {Problem("unexpected", name) for name in info.unexpected_keys}
    problems |= {Problem("mismatched", name, f"{list(written)} where transformers builds {list(built)}")
                 for name, written, built in info.mismatched_keys}
    return problems


@dataclass(frozen=True)
class Part:
    """One submodule of a layer as built: its class, its scalar settings, its parameter shapes."""

    cls: str
    settings: tuple[tuple[str, Any], ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]


def layer_signature(layer: Any) -> dict[str, Part]:
    """What a layer module computes, by submodule path. Two layers with one signature are built alike;
    a position attribute (the cache slot) is left out."""
    signature = {}
    for path, module in layer.named_modules():
        settings = tuple(sorted((k, v) for k, v in vars(module).items()
                                if not k.startswith("_") and k != "training" and k not in POSITION_ATTRIBUTES
                                and isinstance(v, _SCALARS)))
        shapes = tuple((k, tuple(p.shape)) for k, p in module._parameters.items() if p is not None)
        signature[path] = Part(type(module).__name__, settings, shapes)
    return signature


@dataclass(frozen=True)
class Difference:
    """Where two layers are built differently: in their modules (a kind the config decides) or in a
    setting of one module (derived from the position or the layer count), in words."""

    in_modules: bool
    text: str


def signature_difference(built: dict[str, Part], source: dict[str, Part]) -> Difference | None:
    """The first submodule where two signatures differ; None when they are alike."""
    for path in sorted(set(built) | set(source), key=lambda p: (p.count("."), p)):
        mine, theirs = built.get(path), source.get(path)
        if mine == theirs:
            continue
        where = path or "the layer"
        if mine is None or theirs is None:
            return Difference(True, f"{where} is {'absent' if mine is None else mine.cls} where the source layer "
                                    f"has {'none' if theirs is None else theirs.cls}")
        if mine.cls != theirs.cls:
            return Difference(True, f"{where} is a {mine.cls} where the source layer has a {theirs.cls}")
        ours, others = dict(mine.settings), dict(theirs.settings)
        changed = [k for k in sorted(set(ours) | set(others)) if ours.get(k) != others.get(k)]
        if changed:
            return Difference(False, "; ".join(f"{where}.{k} would be {ours.get(k)!r} where the source layer has "
                                               f"{others.get(k)!r}" for k in changed[:2]))
        return Difference(False, f"{where} has parameters {dict(mine.shapes)} where the source layer has "
                                 f"{dict(theirs.shapes)}")
    return None


def layer_list(model: Any, prefix: str, layer_tensor: str) -> Sequence[Any]:
    """The layer modules of a model built on the meta device, found where transformers loads a
    checkpoint's layer tensor (`layer_tensor`, under `prefix.0.`) after its key renames."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model, None, None)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamed, _ = rename_source_key(layer_tensor, renamings, converters, model.base_model_prefix, model.state_dict())
    match = re.match(r"^(.+?)\.0\.", renamed)
    path = match.group(1) if match else prefix
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SurgeryError(f"cannot find the layers of {type(model).__name__} at {path} (checkpoint: {prefix})") from None


def normalized(name: str, prefix: str) -> str:
    """A tensor name with its layer number replaced, to compare problems across layer orders."""
    return re.sub(rf"^{re.escape(prefix)}\.\d+\.", f"{prefix}.*.", name)


def _first_line(error: Exception) -> str:
    """A validator's message in one line: its first two lines (the second names the field's problem)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(error).__name__
