"""Arguments and options several commands share, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Device = Annotated[str, typer.Option(help="Where computed tensors are made: auto (CUDA when present), cpu, cuda.")]
PlanFile = Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="The plan YAML file.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Output folder (default: the plan's `output`).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output folder (or discard an interrupted run's).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: its finished shards are re-hashed and kept.")]
ShardSize = Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
Data = Annotated[list[str] | None, typer.Option(
    "--data", help="builtin (Python's docs), builtin:prose-heldout|code-heldout|mixed-heldout, or a .txt/.jsonl file; "
    "repeat for several.")]


def parse_shard_size(text: str) -> int | str:
    """`--shard-size`: a byte count, or a size with a unit as huggingface_hub reads it (5GB, 500MB)."""
    return int(text) if text.isdigit() else text
