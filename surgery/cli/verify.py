"""`surgery verify`: is a folder a whole, uncorrupted checkpoint, exactly as surgery wrote it?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console, print_json
from surgery.cli.options import Json


@app.command()
def verify(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="An output folder of `surgery apply`, or any model folder.")],
    as_json: Json = False,
) -> None:
    """Re-open every shard and check headers, offsets, index, sizes and the hashes recorded in surgery.json;
    exit 0 only when all hold (1 when one does not)."""
    from surgery.output.verify import verify as verify_folder

    checks = verify_folder(folder)
    failed = [c for c in checks if not c.ok]
    if as_json:
        print_json({"ok": not failed, "checks": [vars(c) for c in checks]})
    else:
        from rich.table import Table

        table = Table(title=f"verify {folder}")
        for column in ("", "what", "found"):
            table.add_column(column, overflow="fold")
        for check in checks:
            table.add_row("[green]ok[/]" if check.ok else "[red]FAIL[/]", check.subject, check.detail)
        console.print(table)
        console.print(f"[red]{len(failed)} check(s) failed[/]" if failed else f"[green]all {len(checks)} checks hold[/]")
    if failed:
        raise typer.Exit(1)
