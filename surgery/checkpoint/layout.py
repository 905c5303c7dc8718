"""Which tensors belong to which layer, for any architecture.

The layer container is found from the tensor names themselves: the name prefix before the first
numeric path component (`model.layers`, `transformer.h`, `gpt_neox.layers`, `encoder.layer`, ...)
whose indices are exactly 0..L-1, with L read from the config. No architecture is hard-coded.

A vision-language model keeps its language model's layer count in a sub-config (`text_config`):
that stack is the one edited, and its layers are the group under `language_model` where the
vision tower has as many layers. `stacks` lists every stack a checkpoint has.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from surgery.checkpoint.config import ConfigPath, stack_config
from surgery.errors import SurgeryError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
# Counts of the other stacks a checkpoint can have (an encoder, a decoder, a vision tower).
STACK_COUNT_KEYS = (*LAYER_COUNT_KEYS, "encoder_layers", "num_encoder_layers", "depth")
# Per-layer lists whose length is the layer count where no count is written (Nemotron-H).
COUNTING_LISTS = ("layers_block_type", "layer_types", "hybrid_override_pattern")
T = TypeVar("T")
_NUMBERED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<suffix>.+)$")


@dataclass(frozen=True)
class Layout:
    """The layer container of a checkpoint: `{prefix}.{i}.{suffix}` names the layer tensors."""

    prefix: str
    num_layers: int
    count_key: str
    config_path: ConfigPath = ()  # where the stack's config sits: () or ("text_config",)

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"

    def split(self, name: str) -> tuple[int, str] | None:
        """(layer index, suffix) for a layer tensor, None for one outside the layers."""
        match = _NUMBERED.match(name)
        if match is None or match["prefix"] != self.prefix:
            return None
        return int(match["index"]), match["suffix"]

    def group(self, tensors: Mapping[str, T]) -> tuple[dict[str, T], list[dict[str, T]]]:
        """The tensors outside the layers by name, and each layer's tensors by suffix."""
        outside: dict[str, T] = {}
        layers: list[dict[str, T]] = [{} for _ in range(self.num_layers)]
        for name, value in tensors.items():
            placed = self.split(name)
            if placed is None:
                outside[name] = value
            else:
                layers[placed[0]][placed[1]] = value
        return outside, layers


def layer_count(config: dict[str, Any], path: ConfigPath = ()) -> tuple[str, int]:
    """The config key holding the layer count of the stack at `path`, and its value."""
    found = _count_in(stack_config(config, path))
    if found is None:
        where = f"{'.'.join(path)} of config.json" if path else "config.json"
        raise SurgeryError(
            f"{where} has no layer count (looked for {', '.join(LAYER_COUNT_KEYS)}); "
            "surgery needs it to place the layer tensors"
        )
    return found


def language_model_path(config: dict[str, Any]) -> ConfigPath:
    """Where the language model's layer count is: the top level, else the one sub-config that has one
    and names text (`text_config`), else the one sub-config that has one."""
    if _count_in(config) is not None:
        return ()
    nested = [key for key, value in config.items() if isinstance(value, dict) and _count_in(value) is not None]
    text = [key for key in nested if any(word in key for word in ("text", "language", "llm"))]
    if len(text) == 1:
        return (text[0],)
    return (nested[0],) if len(nested) == 1 else ()


def find_layout(config: dict[str, Any], tensor_names: Iterable[str], where: str = "checkpoint",
                stack: str | None = None) -> Layout:
    """Locate the layer container edited: the named stack's, else the language model's numbered group
    whose indices are exactly 0..L-1."""
    names = list(tensor_names)
    if stack is not None:
        return _named_stack(config, names, where, stack)
    path = language_model_path(config)
    count_key, num_layers = layer_count(config, path)
    indices = _numbered_groups(names)
    candidates = [p for p, seen in indices.items() if _is_zero_to(seen, num_layers)]
    if len(candidates) > 1:
        language = [p for p in candidates if "language_model" in p or "text_model" in p]
        text = [p for p in candidates if not any(w in p for w in ("vision", "visual", "image", "audio"))]
        candidates = language or (text if len(text) == 1 else candidates)
    if len(candidates) == 1:
        return Layout(prefix=candidates[0], num_layers=num_layers, count_key=count_key, config_path=path)
    key = ".".join((*path, count_key))
    if not candidates:
        found = ", ".join(f"{p}.{{0..{max(s)}}}" for p, s in sorted(indices.items())) or "no numbered tensors"
        raise SurgeryError(
            f"{where}: cannot place the layer tensors: config says {key}={num_layers} but the numbered "
            f"tensor groups are {found}; this layout is not supported"
        )
    named = sorted({stack_name(s) for s in stacks(config, names)})
    raise SurgeryError(
        f"{where}: {', '.join(sorted(candidates))} all have {num_layers} layers; say which the plan edits with "
        f"'stack: NAME' ({', '.join(named) or 'no stack found'})"
    )


def _named_stack(config: dict[str, Any], names: list[str], where: str, stack: str) -> Layout:
    found = stacks(config, names)
    chosen = [s for s in found if stack_name(s) == stack]
    if len(chosen) == 1:
        return chosen[0]
    known = ", ".join(f"{stack_name(s)} ({s.prefix})" for s in found) or "none"
    if not chosen:
        raise SurgeryError(f"{where} has no {stack!r} stack; its stacks: {known}")
    raise SurgeryError(f"{where} has several {stack!r} stacks ({', '.join(s.prefix for s in chosen)}); "
                       "this layout is not supported")


def stacks(config: dict[str, Any], tensor_names: Iterable[str]) -> list[Layout]:
    """Every layer stack of a checkpoint: each (sub-)config's layer count matched to a numbered group
    (a VLM's language model and vision tower, an encoder and a decoder)."""
    groups = _numbered_groups(tensor_names)
    found = []
    paths: list[ConfigPath] = [()] + [(k,) for k, v in config.items() if isinstance(v, dict)]
    for path in paths:
        counts = [(k, v) for k, v in stack_config(config, path).items()
                  if k in STACK_COUNT_KEYS and isinstance(v, int) and not isinstance(v, bool)]
        for key, count in counts:
            for prefix, seen in sorted(groups.items()):
                if _is_zero_to(seen, count) and count > 0:
                    found.append(Layout(prefix=prefix, num_layers=count, count_key=key, config_path=path))
    chosen: dict[str, Layout] = {}
    for layout in found:  # a prefix matched by two counts: the one whose config is named like it wins
        if layout.prefix not in chosen or _named_alike(layout) > _named_alike(chosen[layout.prefix]):
            chosen[layout.prefix] = layout
    return sorted(chosen.values(), key=lambda layout: layout.prefix)


def stack_name(layout: Layout) -> str:
    """What a stack is called in plans and `inspect`: vision, audio, encoder, decoder, else text."""
    words = f"{'.'.join(layout.config_path)}.{layout.prefix}.{layout.count_key}".lower()
    for name, hints in (("vision", ("vision", "visual", "image")), ("audio", ("audio", "speech")),
                        ("encoder", ("encoder",)), ("decoder", ("decoder",))):
        if any(hint in (layout.prefix.lower() if name in ("vision", "audio") else words) for hint in hints):
            return name
    return "text"


_STACK_WORDS = ("text", "vision", "audio", "encoder", "decoder")


def _named_alike(layout: Layout) -> int:
    """How well a stack's count names what its prefix holds: vision_config for a vision tower,
    num_decoder_layers for `decoder.block` (+1), a count naming another stack (-1)."""
    words = {w for key in (*layout.config_path, layout.count_key) for w in key.removesuffix("_config").split("_")
             if w in _STACK_WORDS}
    if not words:
        return 0
    return 1 if any(w in layout.prefix for w in words) else -1


def _count_in(config: dict[str, Any]) -> tuple[str, int] | None:
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    for key in COUNTING_LISTS:
        value = config.get(key)
        if isinstance(value, (list, str)) and value:
            return key, len(value)
    return None


def _is_zero_to(indices: set[int], count: int) -> bool:
    """indices == {0, ..., count - 1}, without building that set (a config's count is untrusted)."""
    return len(indices) == count and (not indices or (min(indices) == 0 and max(indices) == count - 1))


def _numbered_groups(tensor_names: Iterable[str]) -> dict[str, set[int]]:
    indices: dict[str, set[int]] = defaultdict(set)
    for name in tensor_names:
        match = _NUMBERED.match(name)
        if match:
            indices[match["prefix"]].add(int(match["index"]))
    return indices
