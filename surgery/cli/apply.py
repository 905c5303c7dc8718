"""`surgery apply`: validate a plan, stream its edit into the output folder, score it, push it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import byte_progress, console, log, phase, terminate_as_interrupt
from surgery.cli.options import (
    Device,
    Force,
    MaxMemory,
    OutOption,
    PlanFile,
    Resume,
    ShardSize,
    parse_max_memory,
    parse_shard_size,
)
from surgery.cli.render import print_eval, print_recipe
from surgery.formatting import human_bytes

if TYPE_CHECKING:
    from surgery.plan.resolve import Recipe


@app.command()
def apply(
    plan: PlanFile,
    out: OutOption = None,
    force: Force = False,
    resume: Resume = False,
    device: Device = "auto",
    max_memory: MaxMemory = None,
    shard_size: ShardSize = "5GB",
    fsync: Annotated[
        bool, typer.Option("--fsync/--no-fsync", help="Flush the output to disk before it appears (survives power loss).")
    ] = True,
    push_to: Annotated[str | None, typer.Option("--push", metavar="REPO_ID",
                                                help="Push the output to this Hub repo after it is written (and scored).")] = None,
) -> None:
    """Validate a plan against the real checkpoints, then stream the edit into the output folder."""
    from surgery import pipeline

    size, cap = parse_shard_size(shard_size), parse_max_memory(max_memory)

    def written(recipe: Recipe, folder: Path, seconds: float) -> None:
        print_recipe(recipe, size)
        console.print(f"[green]wrote[/] {folder} in {seconds:.2f}s")

    hooks = pipeline.Hooks(log=log, phase=phase, progress=byte_progress, written=written, evaluated=print_eval)
    with terminate_as_interrupt():
        result = pipeline.apply(plan, out=out, force=force, resume=resume, device=device, shard_size=size, fsync=fsync,
                                push_to=push_to, max_memory=cap, hooks=hooks)
    if result.pushed is not None:
        pushed = result.pushed
        console.print(f"[green]pushed[/] {pushed.files} files ({human_bytes(pushed.bytes)}) to {pushed.repo}: {pushed.url}")
