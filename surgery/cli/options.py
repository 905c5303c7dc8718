"""Arguments and options several commands share, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.evaluation.data import BUILTIN

Device = Annotated[str, typer.Option(help="Where computed tensors are made: auto (CUDA when present), cpu, cuda.")]
MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", metavar="SIZE", help="Hold at most SIZE of a model's weights (e.g. 20GB) on the device; the rest "
    "wait in CPU memory, or on disk when the device is the CPU (needs surgery[offload]).")]
ModelHelp = "A model folder, a Hub id (org/name, org/name@revision) or demo:NAME."


def model_folder(ref: str) -> Path:
    """A model named on the command line, as plans name them (a folder, a Hub id, demo:NAME)."""
    from surgery.plan.references import resolve_model_path

    return resolve_model_path(ref, Path.cwd())


PlanFile = Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="The plan YAML file.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Output folder (default: the plan's `output`).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output folder (or discard an interrupted run's).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: its finished shards are re-hashed and kept.")]
ShardSize = Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
Data = Annotated[list[str] | None, typer.Option(
    "--data", help=f"{', '.join(BUILTIN)} (Python's own docs and code, never seen by the demo models' training in "
    "the -heldout and -dev splits), or a .txt/.jsonl file; repeat for several.")]


def parse_max_memory(text: str | None) -> int | None:
    """`--max-memory`, read before any work."""
    from surgery.formatting import memory_bytes

    return None if text is None else memory_bytes(text, "--max-memory")


def parse_shard_size(text: str) -> int:
    """`--shard-size`, read as every shard size is (`shard_size_bytes`), before any work."""
    from surgery.checkpoint.writer import shard_size_bytes

    return shard_size_bytes(text)
