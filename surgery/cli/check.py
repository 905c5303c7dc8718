"""`surgery check`: validate a plan and show what would be written, writing nothing."""

from __future__ import annotations

from surgery.cli.app import app
from surgery.cli.console import console, phase, print_json
from surgery.cli.options import (
    Device,
    Json,
    MaxMemory,
    OutOption,
    PlanFile,
    ShardSize,
    parse_max_memory,
    parse_shard_size,
)
from surgery.cli.render import print_recipe, print_translation


@app.command()
def check(
    plan: PlanFile,
    out: OutOption = None,
    shard_size: ShardSize = "5GB",
    as_json: Json = False,
    device: Device = "auto",
    max_memory: MaxMemory = None,
) -> None:
    """Validate a plan (headers, plus the data its fits need) and print what would be written.
    Exit 0 when valid, 2 when not."""
    from surgery import pipeline
    from surgery.output.partial import partial_folder

    cap = parse_max_memory(max_memory)
    with phase("checking the plan against the checkpoints"):
        recipe = pipeline.check(plan, out=out, device=device, max_memory=cap)
    size = parse_shard_size(shard_size)
    if as_json:
        print_json(recipe.summary(size))
        return
    if recipe.translation is not None:
        print_translation(recipe.translation)
    print_recipe(recipe, size)
    console.print("[green]plan is valid[/]")
    if recipe.output.exists() or recipe.output.is_symlink():
        console.print(f"note: {recipe.output} already exists: `surgery apply` replaces it only with --force",
                      markup=False, highlight=False)
    elif partial_folder(recipe.output).exists():
        console.print(f"note: an interrupted run left {partial_folder(recipe.output)}: `surgery apply` needs "
                      "--resume to continue it, or --force to start over", markup=False, highlight=False)
