"""Where surgery keeps what it can rebuild: the demo models, remembered fits and structure checks. A
record that cannot be read or written is skipped, never an error: everything here can be recomputed."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def cache_home() -> Path:
    """`SURGERY_CACHE`, else ~/.cache/surgery."""
    return Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery")


def read_record(path: Path, key: str) -> Any:
    """The value stored at `path` for `key`, or None when there is none (or it is unreadable, or another key's)."""
    try:
        record = json.loads(path.read_text())
        return record["value"] if record["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_record(path: Path, key: str, value: Any) -> None:
    """Write `value` for `key` whole then rename it into place, so a reader never sees half a record."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps({"key": key, "value": value}))
        os.replace(staging, path)
    except OSError:
        staging.unlink(missing_ok=True)
