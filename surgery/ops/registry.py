"""The op registry. Each op is defined in a module of this package, as `OP` (or, for a family of ops
that share one compute, `OPS`): its step model, its build function, its sentence for the model card and
its paper. The plan's step union, the list of
known ops, dispatch and the card all come from here, so adding an op is adding its module."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.recipe.view import ModelView


@dataclass(frozen=True)
class Op:
    """One edit a plan can ask for."""

    name: str
    step: type[StepModel]  # its pydantic model, with `op: Literal[name]`
    build: Callable[[Any, ModelView, OpContext], ModelView]  # (step, input view, context) -> output view
    describe: Callable[[Any], str]  # the step as one plain sentence, for the model card
    paper: str  # what it implements
    example: dict[str, Any]  # a small valid step, for the docs and the tests


@cache
def registry() -> dict[str, Op]:
    """Every op of this package by name, in name order."""
    import surgery.ops as package

    found: dict[str, Op] = {}
    for module in pkgutil.iter_modules(package.__path__):
        loaded = importlib.import_module(f"{package.__name__}.{module.name}")
        for op in (getattr(loaded, "OP", None), *getattr(loaded, "OPS", ())):
            if not isinstance(op, Op):
                continue
            if op.name in found:  # a developer's slip, caught at the first plan rather than shadowing an op
                raise RuntimeError(f"two op modules register {op.name!r}: {module.name} and another")
            found[op.name] = op
    return dict(sorted(found.items()))


def op_of(step: StepModel) -> Op:
    return registry()[step.op]
