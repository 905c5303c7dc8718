"""Ops: pure functions from (resolved step, input view, context) to an output view.

`OP_FUNCTIONS` maps each plan `op` to its function; the planner applies them in plan order.
"""

from __future__ import annotations

from collections.abc import Callable

from surgery.ops.atlas import atlas
from surgery.ops.bits import bits
from surgery.ops.chain import chain
from surgery.ops.context import OpContext
from surgery.ops.ensemble import ensemble
from surgery.ops.lines import lines
from surgery.ops.merge import task_arithmetic, ties
from surgery.ops.tie import materialize, tie
from surgery.recipe.view import ModelView

OP_FUNCTIONS: dict[str, Callable[..., ModelView]] = {
    "chain": chain, "task_arithmetic": task_arithmetic, "ties": ties, "lines": lines, "atlas": atlas,
    "tie": tie, "materialize": materialize, "ensemble": ensemble, "bits": bits,
}

__all__ = ["OP_FUNCTIONS", "OpContext"]
