"""surgery.json: the record every output folder carries (resolved plan, sources, scores), and the
model card made from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from surgery.checkpoint.reader import is_plain_name, read_json_file
from surgery.errors import SurgeryError
from surgery.output.card import CARD_NAME, model_card

PROVENANCE_NAME = "surgery.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Indented, sorted keys (as transformers writes config.json); replaced atomically."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The folder's surgery.json, or None when it is not a surgery output; one that is not a JSON
    object (or not a regular file, or huge) is a SurgeryError."""
    path = folder / PROVENANCE_NAME
    if not path.exists() and not path.is_symlink():
        return None
    record = read_json_file(path, "surgery record", "re-run `surgery apply` to write it again")
    if not isinstance(record, dict):
        raise SurgeryError(f"{path}: expected a JSON object, found a JSON {type(record).__name__}")
    return record


def plain_file_names(names: object, what: str) -> list[str]:
    """A record's list of file names, each a plain name inside its folder (never `../` or a path)."""
    if not isinstance(names, list) or not all(isinstance(n, str) and is_plain_name(n) for n in names):
        raise SurgeryError(f"{what}: not a list of plain file names in the folder")
    return names


def recorded_source(folder: Path) -> Path | None:
    """The model a surgery output was made from, when its surgery.json names one that still exists."""
    source = (read_provenance(folder) or {}).get("source_model")
    return Path(source) if source and Path(source).is_dir() else None


def write_record(folder: Path, provenance: dict[str, Any], config: dict[str, Any], final: Path | None = None) -> None:
    """surgery.json and the model card, from memory; `final` is where the folder ends up when `folder`
    is the staging folder of the output (the card is titled by its name and loads from its path)."""
    write_json(folder / PROVENANCE_NAME, provenance)
    final = (final or folder).resolve()
    (folder / CARD_NAME).write_text(model_card(provenance, config, final.name, str(final)))
