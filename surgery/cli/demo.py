"""`surgery demo`: build the trained demo models, apply every example plan, show what each did."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console, err_console, print_json
from surgery.cli.options import Device, Json
from surgery.formatting import human_bytes


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its edited models.")] = Path(
        "surgery-demo"
    ),
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Build (or reuse) the small trained demo models, apply the example plans, and show what each did."""
    from rich.table import Table

    from surgery.demo_models import TRAINED, demo_model, example_plans
    from surgery.pipeline import apply
    from surgery.recipe.view import format_layer_map

    say = (err_console if as_json else console).print  # with --json, stdout holds the JSON alone
    for name in TRAINED:
        demo_model(name, log=say)
    say(f"demo models: {', '.join(str(demo_model(n)) for n in TRAINED)}")
    table = Table("plan", "layer map", "layers", "size", "time", "perplexity (reference)", title="example plans")
    for column in table.columns:  # a long name or layer map wraps, never cut off, at 80 columns or in a pipe
        column.overflow = "fold"
    rows = []
    for plan in example_plans():
        say(f"{plan.stem}: editing{' and scoring' if plan.read_text().count('evaluate:') else ''} ...")
        start = time.perf_counter()
        result = apply(plan, out=out_dir / plan.stem, force=True, device=device)
        seconds = time.perf_counter() - start  # the whole step: fits, writing and scoring
        recipe = result.recipe
        datasets = result.evaluation.datasets if result.evaluation else []
        layers = "" if recipe.description else f"{recipe.view.layout.num_layers} -> {len(recipe.view.layers)}"
        layer_map = recipe.description or format_layer_map(recipe.layer_map())
        rows.append({"plan": plan.name, "output": str(out_dir / plan.stem), "layer_map": layer_map, "layers": layers,
                     "bytes": recipe.total_bytes, "seconds": round(seconds, 2),
                     "scores": [{"data": d.data, "perplexity": d.perplexity, "reference": d.base_perplexity}
                                for d in datasets]})
        scores = "\n".join(f"{d.data.removeprefix('builtin:')}: {d.perplexity:.1f} ({d.base_perplexity:.1f})"
                           for d in datasets)
        table.add_row(plan.stem, layer_map, layers, human_bytes(recipe.total_bytes), f"{seconds:.1f}s", scores)
    if as_json:
        print_json({"plans": rows})
        return
    console.print(table)
    console.print(f"edited models are in {out_dir}/; try `surgery inspect {out_dir}/drop-late-layers`")
