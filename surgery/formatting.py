"""Human-readable renderings shared by the CLI and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module at start-up: keep it free of the checkpoint machinery
    from surgery.view import LayerOrigin


def format_layer_map(origins: Sequence[LayerOrigin]) -> str:
    """Runs of consecutive layers from one model, e.g. `base[0-7] base[12-21] b[3] scaled(o_projx0.5)`."""
    runs: list[list[LayerOrigin]] = []
    for origin in origins:
        last = runs[-1][-1] if runs else None
        if last is not None and last.model == origin.model and last.edits == origin.edits and origin.index == last.index + 1:
            runs[-1].append(origin)
        else:
            runs.append([origin])
    parts = []
    for run in runs:
        first, last = run[0], run[-1]
        span = f"{first.index}" if first is last else f"{first.index}-{last.index}"
        parts.append(f"{first.model}[{span}]" + "".join(f" {e}" for e in first.edits))
    return ", ".join(parts)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
