"""`surgery push`: upload an output folder, with its model card, to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.app import app
from surgery.cli.console import console
from surgery.formatting import human_bytes


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="An output folder of `surgery apply`.")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="OWNER/NAME on the Hub (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", metavar="BRANCH", help="Push to this branch (created if needed).")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", metavar="TEXT")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go up, show the card, send nothing.")] = False,
    allow_failed_gates: Annotated[bool, typer.Option("--allow-failed-gates", help="Push a folder that missed its plan's quality gates.")] = False,
) -> None:
    """Upload an output folder (weights, config, tokenizer, surgery.json, model card) to the Hugging Face Hub."""
    from surgery import hub

    if dry_run:
        from rich.table import Table

        from surgery.output.card import CARD_NAME

        files = hub.upload_list(folder, allow_failed_gates)
        table = Table("file", "bytes", title=f"would upload to {repo_id}")
        for name, size in files:
            table.add_row(name, human_bytes(size))
        console.print(table)
        console.print(f"{len(files)} files, {human_bytes(sum(s for _, s in files))}; nothing sent. The card:")
        console.print((folder / CARD_NAME).read_text(), markup=False, highlight=False)
        return
    result = hub.push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      create_pr=create_pr, allow_failed_gates=allow_failed_gates)
    console.print(f"[green]pushed[/] {result.files} files ({human_bytes(result.bytes)}) to {result.repo}: {result.url}")
