"""Per-layer config values, so they follow their layers when layers move.

transformers builds each layer from the config by one of a few kinds of rule: a list with one entry
per layer (`layer_types`, `mlp_layer_types`, Nemotron-H's `hybrid_override_pattern`), a list of the
indices that have some property (`mlp_only_layers`, `moe_layers`), a pattern repeated over the
layers (RecurrentGemma's `block_types`), a count of leading layers (DeepSeek's
`first_k_dense_replace`), a period and offset (Jamba), or settings keyed by layer index (Gemma 4's
`per_layer_config`). Each rule is read into one value per
layer; a changed layer structure writes each rule again from the values its output layers carry,
or refuses, naming the rule, where the rule cannot describe the new order. Scalar settings from
which transformers derives per-layer lists (`max_window_layers`, `sliding_window_pattern`) are
replaced by the explicit lists transformers' own config class derives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

LayerConfig = dict[str, Any]
ConfigPath = tuple[str, ...]  # where the layer stack's config sits in config.json: () or ("text_config",)

log = logging.getLogger(__name__)

# config.json's special token ids: a changed vocabulary renumbers them (ops/vocabulary.py), a demo config
# keeps them inside its vocabulary (demo_models/zoo.py).
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                 "cls_token_id", "unk_token_id", "mask_token_id")


@dataclass(frozen=True)
class ListRule:
    """One entry per layer, as a list (or a string of one character per layer)."""

    key: str

    def read(self, config: dict[str, Any], count: int) -> list[Any] | None:
        value = config.get(self.key)
        return list(value) if isinstance(value, (list, str)) and len(value) == count else None

    def write(self, config: dict[str, Any], values: list[Any]) -> dict[str, Any]:
        return {self.key: "".join(values) if isinstance(config[self.key], str) else values}


@dataclass(frozen=True)
class CyclicRule:
    """A pattern repeated over the layers (RecurrentGemma's `block_types`); written out in full."""

    key: str

    def read(self, config: dict[str, Any], count: int) -> list[Any] | None:
        value = config.get(self.key)
        if not isinstance(value, list) or not value:
            return None
        return [value[i % len(value)] for i in range(count)]

    def write(self, config: dict[str, Any], values: list[Any]) -> dict[str, Any]:
        return {self.key: values}


@dataclass(frozen=True)
class IndexRule:
    """The indices of the layers that have some property (`mlp_only_layers`, `moe_layers`)."""

    key: str

    def read(self, config: dict[str, Any], count: int) -> list[Any] | None:
        value = config.get(self.key)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return None
        chosen = set(value)
        return [i in chosen for i in range(count)]

    def write(self, config: dict[str, Any], values: list[Any]) -> dict[str, Any]:
        return {self.key: [i for i, value in enumerate(values) if value]}


@dataclass(frozen=True)
class PrefixRule:
    """The first k layers are of one kind, the rest of another (`first_k_dense_replace=k`)."""

    key: str

    def read(self, config: dict[str, Any], count: int) -> list[Any] | None:
        value = config.get(self.key)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return [i < value for i in range(count)]

    def write(self, config: dict[str, Any], values: list[Any]) -> dict[str, Any]:
        leading = next((i for i, value in enumerate(values) if not value), len(values))
        if any(values[leading:]):
            late = [i for i, value in enumerate(values) if value and i > leading]
            raise SurgeryError(
                f"{self.key} cannot describe this layer order: output layer {late[0]} comes from one of the first "
                f"{config[self.key]} source layers (the ones {self.key} sets apart) but follows a layer that does "
                f"not; keep those {config[self.key]} source layers first, in any order"
            )
        return {self.key: leading}


@dataclass(frozen=True)
class PeriodicRule:
    """Layer i has the property when i % period == offset (Jamba's attention and expert layers)."""

    period_key: str
    offset_key: str

    @property
    def key(self) -> str:
        return f"{self.period_key}/{self.offset_key}"

    def read(self, config: dict[str, Any], count: int) -> list[Any] | None:
        period, offset = config.get(self.period_key), config.get(self.offset_key)
        if not isinstance(period, int) or not isinstance(offset, int) or period < 1:
            return None
        return [i % period == offset for i in range(count)]

    def write(self, config: dict[str, Any], values: list[Any]) -> dict[str, Any]:
        count = len(values)
        for period in range(1, count + 2):
            for offset in range(period):
                if [i % period == offset for i in range(count)] == values:
                    return {self.period_key: period, self.offset_key: offset}
        marked = [i for i, value in enumerate(values) if value]
        raise SurgeryError(
            f"{self.period_key} and {self.offset_key} cannot describe this layer order: output layers "
            f"{marked} would need their kind, and no period and offset picks exactly those; "
            f"put them every {config[self.period_key]} layers"
        )


@dataclass(frozen=True)
class KeyedRule:
    """Settings for some layers, keyed by layer index (Gemma 4's `per_layer_config: {"05": {...}}`)."""

    key: str

    def read(self, config: dict[str, Any], count: int) -> list[Any] | None:
        value = config.get(self.key)
        if not isinstance(value, dict) or not all(str(k).isdigit() for k in value):
            return None
        by_index = {int(k): v for k, v in value.items()}
        return [by_index.get(i) for i in range(count)]

    def write(self, config: dict[str, Any], values: list[Any]) -> dict[str, Any]:
        width = max((len(str(k)) for k in config[self.key]), default=1)  # keys written as they were: "05"
        return {self.key: {f"{i:0{width}d}": v for i, v in enumerate(values) if v is not None}}


Rule = ListRule | CyclicRule | IndexRule | KeyedRule | PrefixRule | PeriodicRule
RULES: tuple[Rule, ...] = (
    *(ListRule(k) for k in ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type",
                            "hybrid_override_pattern", "attention_layer_types", "layers_attention_type")),
    CyclicRule("block_types"),
    KeyedRule("per_layer_config"),
    *(IndexRule(k) for k in ("mlp_only_layers", "moe_layers", "full_attn_idxs", "attn_layer_indices",
                             "swa_layers", "global_attn_layers")),
    *(PrefixRule(k) for k in ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")),
    PeriodicRule("attn_layer_period", "attn_layer_offset"),
    PeriodicRule("expert_layer_period", "expert_layer_offset"),
)
# Scalar settings from which transformers derives per-layer lists when none are written.
DERIVATION_HINTS = ("max_window_layers", "sliding_window_pattern", "use_sliding_window", "no_rope_layer_interval",
                    "interleave_moe_layer_step", "attention_chunk_size")
DERIVED_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "moe_layers")


def stack_config(config: dict[str, Any], path: ConfigPath) -> dict[str, Any]:
    """The sub-config of the layer stack at `path` (the whole config for a plain language model)."""
    for key in path:
        config = config[key]
    return config


def rule_settings(config: dict[str, Any], path: ConfigPath = ()) -> list[str]:
    """The per-layer rules a config uses, as `key=value` (for messages and the card)."""
    stack = stack_config(config, path)
    settings = []
    for rule in RULES:
        keys = _rule_keys(rule)
        if all(k in stack for k in keys):
            settings.append(", ".join(f"{k}={_brief(stack[k])}" for k in keys))
    return settings


def rules_of(config: dict[str, Any], count: int) -> list[Rule]:
    """The known rules, and every other list in the config with one entry per layer (a per-layer
    setting no rule here names, such as Granite's `layer_rope_theta`, follows its layers too)."""
    known = {k for rule in RULES for k in _rule_keys(rule)}
    extra = [ListRule(k) for k, v in config.items() if k not in known and isinstance(v, list) and len(v) == count
             and count > 1 and k != "architectures" and not k.endswith("_token_id")]
    return [*RULES, *extra]


def per_layer_values(config: dict[str, Any], count: int, folder: Path, path: ConfigPath = ()) -> list[LayerConfig]:
    """One dict per layer with the value each per-layer rule gives it."""
    effective = _effective(stack_config(config, path), folder, path)
    layers: list[LayerConfig] = [{} for _ in range(count)]
    for rule in rules_of(effective, count):
        values = rule.read(effective, count)
        if values is not None:
            for layer, value in zip(layers, values):
                layer[rule.key] = value
    return layers


# Keys some configs keep beside the layer count, with the same value (xLSTM builds num_blocks blocks).
COUNT_ALIASES: dict[str, tuple[str, ...]] = {"num_hidden_layers": ("num_blocks",)}


def rewrite_config(config: dict[str, Any], count_key: str, layers: Sequence[LayerConfig],
                   path: ConfigPath = ()) -> dict[str, Any]:
    """config.json for a model whose layers carry `layers` (one per output layer, in order); each rule
    is written from its values, or refused where it cannot express them."""
    out = _copy_along(config, path)
    stack = stack_config(out, path)
    if not isinstance(stack.get(count_key), (list, str)):  # a count written as a number (else a list's length)
        for alias in COUNT_ALIASES.get(count_key, ()):
            if stack.get(alias) == stack[count_key]:
                stack[alias] = len(layers)
        stack[count_key] = len(layers)
    keys = {k for layer in layers for k in layer}
    rules = {rule.key: rule for rule in RULES}
    for key in sorted(keys):
        rule = rules.get(key, ListRule(key))
        values = [layer[key] for layer in layers]
        if _rule_keys(rule)[0] not in stack:  # derived from a scalar setting: written out explicitly
            stack[key] = values
        else:
            stack.update(rule.write(stack, values))
    return out


def _rule_keys(rule: Rule) -> tuple[str, ...]:
    return (rule.period_key, rule.offset_key) if isinstance(rule, PeriodicRule) else (rule.key,)


def _copy_along(config: dict[str, Any], path: ConfigPath) -> dict[str, Any]:
    """A copy of config.json with the dicts on `path` copied too, so the source's is never changed."""
    out = dict(config)
    node = out
    for key in path:
        node[key] = dict(node[key])
        node = node[key]
    return out


def _effective(config: dict[str, Any], folder: Path, path: ConfigPath) -> dict[str, Any]:
    """The config with the per-layer lists transformers would derive from its scalar settings.

    Explicit lists are taken as written. When none is written but a scalar setting could derive one,
    transformers' own config class is asked, so the derivation is transformers' and not a copy of it.
    """
    if any(k in config for k in DERIVED_KEYS) or not any(k in config for k in DERIVATION_HINTS):
        return config
    try:
        from transformers import AutoConfig

        derived = AutoConfig.from_pretrained(folder)
        for key in path:
            derived = getattr(derived, key)
        effective = derived.to_dict()
    except Exception as e:  # an architecture transformers does not know: the written config is all there is
        log.debug("transformers could not read %s (%s); using config.json as written", folder, e)
        return config
    return config | {k: effective[k] for k in DERIVED_KEYS if k in effective}


def _brief(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
