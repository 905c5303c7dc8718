"""The terminal view of a diff: a summary first, detail after."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from surgery.checkpoint.modules import MODULE_KINDS
from surgery.comparison.report import DiffReport
from surgery.recipe.view import LayerOrigin, format_layer_map


def print_diff(report: DiffReport, console: Console, top: int) -> None:
    verdict = "[yellow]differ[/]" if report.differs else "[green]identical[/]"
    console.print(f"[bold]{report.a}[/] -> [bold]{report.b}[/]: {verdict}")
    for note in report.notes:
        console.print(f"note: {note}")
    config = len(report.config_changed) + len(report.config_added) + len(report.config_removed)
    console.print(
        f"config: {len(report.config_changed)} changed, {len(report.config_added)} added, "
        f"{len(report.config_removed)} removed; tensors: {len(report.unchanged)} unchanged, {len(report.changed)} "
        f"changed, {len(report.added)} added, {len(report.removed)} removed, {len(report.reshaped)} reshaped, "
        f"{len(report.dtype_changed)} dtype changed"
    )
    if report.layers:
        console.print(f"layers of B from A ({len(report.layers)}): {_layer_map(report)}")
    if config:
        table = Table("config key", "A", "B", title="config")
        for key, (old, new) in report.config_changed.items():
            table.add_row(key, _short(old), _short(new))
        for key, value in report.config_added.items():
            table.add_row(key, "", _short(value))
        for key, value in report.config_removed.items():
            table.add_row(key, _short(value), "")
        console.print(table)
    changed_layers = [layer for layer in report.layers if layer.change.diff_sq > 0]
    if changed_layers:
        kinds = [k for k in MODULE_KINDS if any(k in layer.modules for layer in changed_layers)]
        table = Table("layer", "vs A", "||B-A||", "||B-A||/||A||", "cosine", *kinds,
                      title="changed layers (the update's depth profile)")
        for layer in changed_layers:
            table.add_row(
                str(layer.index), "none" if layer.closest is None else str(layer.closest),
                f"{layer.change.update_norm:.4g}", f"{layer.change.relative:.4g}", f"{layer.change.cosine:.6f}",
                *(f"{layer.modules[k].relative:.4g}" if k in layer.modules else "" for k in kinds),
            )
        console.print(table)
    if report.modules:
        table = Table("module", "||B-A||", "||B-A||/||A||", title="by module type")
        for kind, change in sorted(report.modules.items()):
            table.add_row(kind, f"{change.update_norm:.4g}", f"{change.relative:.4g}")
        console.print(table)
    if report.changed and top:
        table = Table("tensor (B)", "vs (A)", "rel. change", "cosine", "max |diff|", title=f"top {top} changed")
        for t in report.top(top):
            table.add_row(t.name, "" if t.source == t.name else t.source, f"{t.change.relative:.4g}",
                          f"{t.change.cosine:.6f}", f"{t.change.max_abs:.4g}")
        console.print(table)
    for label, names in (("added", report.added), ("removed", report.removed), ("reshaped", report.reshaped)):
        if names:
            shown = ", ".join(names[:8]) + (f" ... (+{len(names) - 8})" if len(names) > 8 else "")
            console.print(f"{label}: {shown}")


def _layer_map(report: DiffReport) -> str:
    """Identical layers as runs (`A[0-7], A[12-21]`); changed ones as `A[5] changed`, `new`."""
    origins = []
    for layer in report.layers:
        if layer.identical_to is not None:
            origins.append(LayerOrigin("A", layer.identical_to))
        elif layer.closest is not None:
            origins.append(LayerOrigin("A", layer.closest, ("changed",)))
        else:
            origins.append(LayerOrigin("new", layer.index))
    return format_layer_map(origins)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
