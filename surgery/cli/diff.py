"""`surgery diff`: what changed between two checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console, print_json
from surgery.cli.options import Json, ModelHelp, model_folder


@app.command("diff")
def diff_(
    a: Annotated[str, typer.Argument(metavar="A", help="The reference checkpoint (e.g. the base). " + ModelHelp)],
    b: Annotated[str, typer.Argument(metavar="B", help="The checkpoint compared with it.")],
    as_json: Json = False,
    top: Annotated[int, typer.Option("--top", min=0, help="How many most-changed tensors to list.")] = 10,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Heat map of per-layer, "
                                              "per-module relative change (needs surgery[plot]).")] = None,
    include: Annotated[str | None, typer.Option("--include", metavar="REGEX", help="Only tensors matching.")] = None,
    exclude: Annotated[str | None, typer.Option("--exclude", metavar="REGEX", help="Skip tensors matching.")] = None,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="Absolute tolerance for 'unchanged'.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, help="Relative tolerance for 'unchanged'.")] = 0.0,
    exit_code: Annotated[bool, typer.Option("--exit-code", help="Exit 1 when the checkpoints differ.")] = False,
) -> None:
    """What changed between two checkpoints: config, tensors, and the layer of A each layer of B is."""
    from surgery.comparison.report import diff

    report = diff(model_folder(a), model_folder(b), include=include, exclude=exclude, atol=atol, rtol=rtol)
    if plot is not None:
        from surgery.comparison.plot import heat_map

        heat_map(report, plot)
    if as_json:
        print_json(report.to_dict(top))
    else:
        from surgery.comparison.render import print_diff

        print_diff(report, console, top)
    if exit_code and report.differs:
        raise typer.Exit(1)
