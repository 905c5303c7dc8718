"""`surgery analyze --plot`: the measurements as a picture (optional: `surgery[plot]`)."""

from __future__ import annotations

from pathlib import Path

from surgery.analysis.measure import Analysis
from surgery.errors import SurgeryError


def plot_analysis(analysis: Analysis, path: Path) -> None:
    """Depth profiles of every metric, and the i -> i+n distance heat map."""
    try:
        import matplotlib
    except ImportError:
        raise SurgeryError("--plot needs matplotlib: pip install 'surgery[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (profiles, heat) = plt.subplots(1, 2, figsize=(12, 4.5))
    depth = range(len(analysis.layers))
    for metric in ("bi", "zd", "attn", "mlp", "layer"):
        values = [getattr(m, metric) for m in analysis.layers]
        if all(v is not None for v in values):
            profiles.plot(depth, values, marker="o", label=metric)
    profiles.set(title="per-layer metrics", xlabel="layer", yscale="log")
    profiles.legend()
    rows = sorted(analysis.distances)
    width = len(analysis.layers)
    grid = [[analysis.distances[n][i] if i < len(analysis.distances[n]) else float("nan") for i in range(width)]
            for n in rows]
    image = heat.imshow(grid, aspect="auto", cmap="viridis")
    heat.set(title="angular distance, layer i to i+n", xlabel="i", ylabel="n", yticks=range(len(rows)),
             yticklabels=rows)
    figure.colorbar(image, ax=heat)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
