"""surgery.json: the record every output folder carries (resolved plan, sources, scores)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROVENANCE_NAME = "surgery.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Indented, sorted keys (as transformers writes config.json); replaced atomically."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The folder's surgery.json, or None when it is not a surgery output."""
    path = folder / PROVENANCE_NAME
    return json.loads(path.read_text()) if path.is_file() else None
