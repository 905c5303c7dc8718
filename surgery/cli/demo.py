"""`surgery demo`: build the trained demo models, apply every example plan, show what each did."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console
from surgery.cli.options import Device
from surgery.formatting import human_bytes


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its edited models.")] = Path(
        "surgery-demo"
    ),
    device: Device = "auto",
) -> None:
    """Build (or reuse) the small trained demo models, apply the example plans, and show what each did."""
    from rich.table import Table

    from surgery.demo_models import TRAINED, demo_model, example_plans
    from surgery.pipeline import apply
    from surgery.recipe.view import format_layer_map

    for name in TRAINED:
        demo_model(name, log=console.print)
    console.print(f"demo models: {', '.join(str(demo_model(n)) for n in TRAINED)}")
    table = Table("plan", "layer map", "layers", "size", "time", "perplexity (reference)", title="example plans")
    for plan in example_plans():
        result = apply(plan, out=out_dir / plan.stem, force=True, device=device)
        recipe = result.recipe
        scores = "\n".join(f"{d.data.removeprefix('builtin:')}: {d.perplexity:.1f} ({d.base_perplexity:.1f})"
                           for d in (result.evaluation.datasets if result.evaluation else []))
        layers = "" if recipe.description else f"{recipe.view.layout.num_layers} -> {len(recipe.view.layers)}"
        table.add_row(plan.name, recipe.description or format_layer_map(recipe.layer_map()), layers,
                      human_bytes(recipe.total_bytes), f"{result.seconds:.2f}s", scores)
    console.print(table)
    console.print(f"edited models are in {out_dir}/; try `surgery inspect {out_dir}/drop-late-layers`")
