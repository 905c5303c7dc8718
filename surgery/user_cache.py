"""Where surgery keeps what it can rebuild: the demo models and remembered fits."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """`SURGERY_CACHE`, else ~/.cache/surgery."""
    return Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery")
