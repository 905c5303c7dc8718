"""Which tensors belong to which layer, for any architecture.

The layer container is found from the tensor names themselves: the name prefix before the first
numeric path component (`model.layers`, `transformer.h`, `gpt_neox.layers`, `encoder.layer`, ...)
whose indices are exactly 0..L-1, with L read from the config. No architecture is hard-coded.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from surgery.errors import SurgeryError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
T = TypeVar("T")
_NUMBERED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<suffix>.+)$")


@dataclass(frozen=True)
class Layout:
    """The layer container of a checkpoint: `{prefix}.{i}.{suffix}` names the layer tensors."""

    prefix: str
    num_layers: int
    count_key: str

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


def layer_count(config: dict[str, Any]) -> tuple[str, int]:
    """The config key holding the layer count, and its value."""
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    raise SurgeryError(
        f"config.json has no layer count (looked for {', '.join(LAYER_COUNT_KEYS)}); "
        "surgery needs it to place the layer tensors"
    )


def find_layout(config: dict[str, Any], tensor_names: Iterable[str], where: str = "checkpoint") -> Layout:
    """Locate the layer container whose indices are exactly 0..L-1 for the config's L."""
    count_key, num_layers = layer_count(config)
    indices: dict[str, set[int]] = defaultdict(set)
    for name in tensor_names:
        match = _NUMBERED.match(name)
        if match:
            indices[match["prefix"]].add(int(match["index"]))
    candidates = [p for p, seen in indices.items() if seen == set(range(num_layers))]
    if len(candidates) == 1:
        return Layout(prefix=candidates[0], num_layers=num_layers, count_key=count_key)
    if not candidates:
        found = ", ".join(f"{p}.{{0..{max(s)}}}" for p, s in sorted(indices.items())) or "no numbered tensors"
        raise SurgeryError(
            f"{where}: cannot place the layer tensors: config says {count_key}={num_layers} but the numbered "
            f"tensor groups are {found}; this layout is not supported"
        )
    raise SurgeryError(
        f"{where}: ambiguous layout: {', '.join(sorted(candidates))} all have {num_layers} layers; "
        "this layout is not supported"
    )
