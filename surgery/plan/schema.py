"""One pydantic model per op. Unknown keys are errors: a typo must never pass silently."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_SINGLE = re.compile(r"^\s*(\d+)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _nonempty_list(value: Any) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("no layers given; list at least one layer, e.g. [0-7, 12]")
    return items


def parse_layers(value: Any) -> list[int]:
    """Ints and inclusive "a-b" ranges, alone or in a list, to layer indices in order."""
    items = _nonempty_list(value)
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{item!r} is not a layer; use an integer or an inclusive range like '0-7'")
        if isinstance(item, int):
            if item < 0:
                raise ValueError(f"layer {item} is negative; layers count from 0")
            out.append(item)
            continue
        if isinstance(item, str):
            if m := _SINGLE.match(item):
                out.append(int(m[1]))
                continue
            if m := _RANGE.match(item):
                start, stop = int(m[1]), int(m[2])
                if stop < start:
                    raise ValueError(
                        f"range '{item}' is reversed; write '{stop}-{start}' or list the layers in the order you want"
                    )
                out.extend(range(start, stop + 1))
                continue
        raise ValueError(f"{item!r} is not a layer; use an integer or an inclusive range like '0-7'")
    return out


class LayerEntry(_Strict):
    """A run of layers, optionally from another model, optionally with some tensors scaled."""

    model: str | None = Field(default=None, description="Source model; default: the plan's model.")
    layers: list[int] = Field(description="Layer indices: ints and inclusive 'a-b' ranges.")
    scale: dict[str, float] | None = Field(
        default=None, description="Multiply the tensors of these modules (e.g. o_proj: 0.5) in these layers."
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> list[int]:
        return parse_layers(value)


class ChainStep(_Strict):
    """Write a model whose layers are any sequence of source layers (CoLa, mergekit passthrough)."""

    op: Literal["chain"]
    layers: list[LayerEntry] = Field(min_length=1)

    @field_validator("layers", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> list[Any]:
        """Bare ints and ranges are entries from the current model; consecutive ones form one entry."""
        entries: list[Any] = []
        for item in _nonempty_list(value):
            if isinstance(item, dict):
                entries.append(item)
            elif entries and isinstance(entries[-1], LayerEntry) and entries[-1].model is None:
                entries[-1] = LayerEntry(layers=entries[-1].layers + parse_layers(item))
            else:
                entries.append(LayerEntry(layers=parse_layers(item)))
        return entries


Step = ChainStep
OPS: dict[str, type[BaseModel]] = {"chain": ChainStep}


class EvaluateSection(_Strict):
    """Score the output after `apply`, beside a reference model, on the same tokens."""

    data: list[str] = Field(default_factory=lambda: ["builtin"], description="builtin, builtin:NAME, or files.")
    max_tokens: int = Field(default=8192, ge=2, description="Score the first N tokens of each text.")
    window: int | None = Field(default=None, ge=2, description="Tokens per forward pass (default: min(2048, context)).")
    stride: int | None = Field(default=None, ge=1, description="New tokens per window (default: window / 2).")
    batch_size: int = Field(default=4, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    compare_to: str = Field(default="model", description="base | model | PATH: the reference scored beside it.")

    @field_validator("data", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Plan(_Strict):
    """A whole plan: the source model, where to write, and the steps applied in one streaming pass."""

    model: str | None = Field(default=None, description="The model the steps edit (path or demo:NAME).")
    base: str | None = Field(default=None, description="The pretrained model edits are measured against.")
    output: str | None = Field(default=None, description="Output folder; `--out` overrides it.")
    steps: list[Step] = Field(min_length=1)
    evaluate: EvaluateSection | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _known_ops(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, step in enumerate(value):
                if isinstance(step, dict) and "op" not in step:
                    raise ValueError(f"step {i} has no 'op'; known ops: {', '.join(OPS)}")
                if isinstance(step, dict) and step["op"] not in OPS:
                    raise ValueError(f"step {i}: unknown op {step['op']!r}; known ops: {', '.join(OPS)}")
        return value
