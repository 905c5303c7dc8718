"""Ops: pure functions from (resolved step, input view) to an output view.

`OP_FUNCTIONS` maps each plan `op` to its function; the planner applies them in plan order.
"""

from __future__ import annotations

from collections.abc import Callable

from surgery.ops.chain import chain
from surgery.view import ModelView

OpenModel = Callable[[str], ModelView]
OP_FUNCTIONS: dict[str, Callable[..., ModelView]] = {"chain": chain}

__all__ = ["OP_FUNCTIONS", "OpenModel", "chain"]
