"""`surgery materialize`: a compact recursive or trit-plane model as a standard checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import byte_progress, console, log, terminate_as_interrupt
from surgery.cli.options import Device, Force, Resume, ShardSize, parse_shard_size


@app.command()
def materialize(
    compact: Annotated[Path, typer.Argument(metavar="COMPACT", help="A compact recursive model (written by `tie`) or trit-planes (by `ptqtp`).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Where the standard checkpoint goes.")],
    force: Force = False,
    resume: Resume = False,
    device: Device = "auto",
    shard_size: ShardSize = "5GB",
) -> None:
    """Write a compact recursive model (each depth: its shared layer + B A) or trit-planes (each matrix:
    a1 t1 + a2 t2) as a standard checkpoint plain transformers loads."""
    from surgery.pipeline import Hooks, apply, materialize_plan

    hooks = Hooks(log=log, progress=byte_progress, written=lambda recipe, folder, seconds: console.print(f"[green]wrote[/] {folder}"))
    with terminate_as_interrupt():
        apply(materialize_plan(compact), out=out, force=force, resume=resume, device=device,
              shard_size=parse_shard_size(shard_size), hooks=hooks)
