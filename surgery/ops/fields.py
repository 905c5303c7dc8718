"""What every op's step model is made of: strict models, layer lists, and the step's place in a plan."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

MAX_LAYERS = 100_000  # more layers than any model has: a bound before a typo's range is allocated
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_SINGLE = re.compile(r"^\s*(\d+)\s*$")


class Strict(BaseModel):
    """A part of a plan: unknown keys are errors (a typo must never pass silently), values are frozen,
    and a number is finite (YAML's .nan and .inf would write a model of NaN nobody asked for)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StepModel(Strict):
    """One step of a plan; each op's model adds `op: Literal[NAME]` and its fields."""

    op: str
    # Whether the step can edit any layer stack (a vision tower, an encoder): false where it runs
    # the language model (a fit, a calibration) or writes a format only a language model loads.
    edits_any_stack: ClassVar[bool] = False
    # Whether the step writes the format it received (heal trains a compact model and keeps it compact),
    # so it may follow a step that writes a storage format.
    keeps_storage: ClassVar[bool] = False

    def starting_model(self) -> str | None:
        """The model a plan without `model:` starts from, when this step names one."""
        return None

    def storage_format(self) -> tuple[str, str] | None:
        """(its `format`, the one to use instead) when the step writes a storage format of surgery's own,
        which nothing can edit after it."""
        return None

    def placement_error(self, index: int, steps: list[StepModel], plan_model: str | None) -> str | None:
        """Why this step cannot stand at `index` of `steps` (in a plan whose `model:` is `plan_model`), if it cannot."""
        storage = self.storage_format()
        if storage is not None and not all(later.keeps_storage for later in steps[index + 1:]):
            written, instead = storage
            return (f"step {index}: {self.op} with format: {written} must be the last step but heal ({written} is a "
                    f"storage format); use format: {instead} to keep editing after it")
        return None


def nonempty_list(value: Any) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("no layers given; list at least one layer, e.g. [0-7, 12]")
    return items


def parse_layers(value: Any) -> list[int]:
    """Ints and inclusive "a-b" ranges, alone or in a list, to layer indices in order."""
    items = nonempty_list(value)
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
                if stop - start >= MAX_LAYERS:
                    raise ValueError(f"range '{item}' has {stop - start + 1:,} layers; a plan lists at most "
                                     f"{MAX_LAYERS:,}")
                out.extend(range(start, stop + 1))
                continue
        raise ValueError(f"{item!r} is not a layer; use an integer or an inclusive range like '0-7'")
    if len(out) > MAX_LAYERS:
        raise ValueError(f"{len(out):,} layers listed; a plan lists at most {MAX_LAYERS:,}")
    return out
