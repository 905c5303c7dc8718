"""`surgery demo`: build the trained demo models, apply every example plan, show what each did."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from surgery.execute import execute
from surgery.fixtures.demo import TRAINED, demo_model
from surgery.formatting import human_bytes
from surgery.pipeline import evaluate_output
from surgery.plan.resolve import resolve
from surgery.recipe.view import format_layer_map


def example_plans() -> list[Path]:
    """The plans in plans/: package data in an installed wheel, the folder itself in a checkout."""
    try:
        folder = Path(str(resources.files("surgery.example_plans")))
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[1] / "plans"
    return sorted(folder.glob("*.yaml"))


def run_demo(out_dir: Path, device: str, console: Console) -> None:
    for name in TRAINED:
        demo_model(name, log=console.print)
    console.print(f"demo models: {', '.join(str(demo_model(n)) for n in TRAINED)}")
    table = Table("plan", "layer map", "layers", "size", "time", "perplexity (reference)", title="example plans")
    for plan in example_plans():
        recipe = resolve(plan, out_dir / plan.stem, device)
        start = time.perf_counter()
        execute(recipe, force=True, device=device)
        elapsed = time.perf_counter() - start
        scores = ""
        if recipe.plan.evaluate is not None:
            report = evaluate_output(recipe, device)
            scores = "\n".join(
                f"{d.data.removeprefix('builtin:')}: {d.perplexity:.1f} ({d.base_perplexity:.1f})" for d in report.datasets
            )
        description = recipe.view.storage.description if recipe.view.storage else None
        layers = "" if description else f"{recipe.view.layout.num_layers} -> {len(recipe.view.layers)}"
        table.add_row(plan.name, description or format_layer_map(recipe.layer_map()), layers,
                      human_bytes(recipe.total_bytes), f"{elapsed:.2f}s", scores)
    console.print(table)
    console.print(f"edited models are in {out_dir}/; try `surgery inspect {out_dir}/drop-late-layers`")
