"""Merge parameters that vary over depth and by module, as mergekit's configs write them.

A numeric parameter is one of:
- a number: every tensor;
- a list of numbers, a gradient: spread piecewise-linearly over the layers, layer l of L at
  t = l / (L - 1) (t = 1 for one layer); tensors outside the layers (embeddings, final norm, head)
  take t = 0, the first value;
- a list of conditions, `{filter: NAME_PART | kind: KIND, value: NUMBER | GRADIENT}`: the first whose
  filter is part of the tensor's name (or whose module kind matches: attention, mlp, norm, embedding,
  other) decides; one with neither is the fallback. A tensor no condition matches takes the next
  level's value.
Precedence, highest first: a model entry's own value, the step's value, the op's default.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from surgery.checkpoint.modules import module_kind
from surgery.errors import SurgeryError
from surgery.ops.fields import Strict
from surgery.recipe.view import ModelView

Gradient = list[float]
Kind = Literal["attention", "mlp", "norm", "embedding", "other"]


class Condition(Strict):
    """One case of a parameter: its value where the filter (or module kind) matches."""

    value: Union[float, Gradient]  # noqa: UP007
    filter: str | None = Field(default=None, description="A part of the tensor's name, e.g. self_attn or mlp.")
    kind: Kind | None = Field(default=None, description="A module kind: attention, mlp, norm, embedding, other.")

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        if self.filter is not None and self.kind is not None:
            raise ValueError("a condition takes 'filter' or 'kind', not both; split it into two conditions")
        if isinstance(self.value, list) and not self.value:
            raise ValueError("a gradient needs at least one value")
        return self

    def matches(self, name: str) -> bool:
        if self.kind is not None:
            return module_kind(name) == self.kind
        return self.filter in (None, "*") or self.filter in name


def _one_form(value: Any) -> Any:
    """Which of the three forms a value is, so an error names the form meant, not every form tried."""
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        if not all(isinstance(item, (dict, Condition)) for item in value):
            raise ValueError("a list of conditions holds only {filter|kind: ..., value: ...} mappings")
        try:
            return [item if isinstance(item, Condition) else Condition.model_validate(item) for item in value]
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"condition {where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") \
                from None
    if isinstance(value, list) and not value:
        raise ValueError("an empty list; give a number, a gradient like [0, 0.5, 1], or conditions")
    if isinstance(value, bool) or (not isinstance(value, (int, float, list))):
        if isinstance(value, str) and _is_number(value):  # YAML 1.1 reads 1e-9 (no dot) as text
            raise ValueError(f"{value!r} is read as text by YAML; write it with a dot, like "
                             f"{value.lower().replace('e', '.0e', 1)}")
        raise ValueError(f"{value!r} is not a number, a gradient like [0, 0.5, 1], or a list of conditions")
    return value


Varying = Annotated[Union[float, Gradient, list[Condition]], BeforeValidator(_one_form)]  # noqa: UP007


def depth_of(view: ModelView, name: str) -> float:
    """The tensor's place on a gradient: l / (L - 1) in the layers, 0 outside them (mergekit's t)."""
    placed = view.layout.split(name)
    if placed is None:
        return 0.0
    layers = len(view.layers)
    return placed[0] / (layers - 1) if layers > 1 else 1.0


def value_at(setting: Varying | None, name: str, t: float) -> float | None:
    """The setting's value for tensor `name` at depth t, or None where no condition matches."""
    if setting is None or isinstance(setting, (int, float)):
        return None if setting is None else float(setting)
    if setting and all(isinstance(item, Condition) for item in setting):
        for condition in setting:
            assert isinstance(condition, Condition)
            if condition.matches(name):
                return value_at(condition.value, name, t)
        return None
    return along(setting, t)  # type: ignore[arg-type]


def along(values: Gradient, t: float) -> float:
    """A gradient's value at t in [0, 1], piecewise-linear between evenly spaced points."""
    if not values:
        raise SurgeryError("a gradient needs at least one value")
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def first_of(name: str, t: float, default: float, *settings: Varying | None) -> float:
    """The highest-precedence setting that has a value for this tensor, else the default."""
    for setting in settings:
        value = value_at(setting, name, t)
        if value is not None:
            return value
    return default


def check_filters(op: str, parameter: str, setting: Varying | None, names: Iterable[str]) -> None:
    """A filter that matches no tensor is a typo (`self_atn`): refuse it rather than ignore it."""
    if not isinstance(setting, list):
        return
    names = list(names)
    for condition in setting:
        if isinstance(condition, Condition) and condition.filter not in (None, "*") and condition.kind is None:
            if not any(condition.filter in name for name in names):
                raise SurgeryError(f"{op}: {parameter}'s filter {condition.filter!r} matches no tensor of the model; "
                                   f"use a part of a tensor name (e.g. self_attn, mlp) or kind: attention|mlp|norm")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
