"""A PNG heat map of per-layer, per-module relative change (matplotlib: `pip install 'surgery[plot]'`)."""

from __future__ import annotations

from pathlib import Path

from surgery.checkpoint.modules import MODULE_KINDS
from surgery.comparison.report import DiffReport
from surgery.errors import SurgeryError


def heat_map(report: DiffReport, path: Path) -> None:
    """Rows: module kinds; columns: layers of B; colour: ||B-A||/||A|| (blank where unchanged)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError("--plot needs matplotlib: pip install 'surgery[plot]'") from None
    if not report.layers:
        raise SurgeryError("--plot: no layer view for these checkpoints (see the notes of the diff)")
    kinds = [k for k in MODULE_KINDS if any(k in layer.modules for layer in report.layers)] or ["attention", "mlp"]
    grid = [[layer.modules[k].relative if k in layer.modules else float("nan") for layer in report.layers]
            for k in kinds]
    figure, axes = plt.subplots(figsize=(max(6, 0.4 * len(report.layers) + 2), 0.6 * len(kinds) + 1.8))
    image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_yticks(range(len(kinds)), kinds)
    axes.set_xticks(range(len(report.layers)), [str(layer.index) for layer in report.layers])
    axes.set_xlabel("layer of B")
    axes.set_title(f"||B-A|| / ||A||: {Path(report.a).name} -> {Path(report.b).name}", fontsize=10)
    figure.colorbar(image, ax=axes, label="relative change")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
