"""Model references in plans: folders (relative to the plan) and `demo:NAME` demo models."""

from __future__ import annotations

import sys
from pathlib import Path

DEMO_SCHEME = "demo:"


def resolve_model_path(ref: str, base_dir: Path) -> Path:
    """A model reference to a folder: paths are relative to `base_dir`; `demo:NAME` is a demo model."""
    if ref.startswith(DEMO_SCHEME):
        from surgery.demo_models import demo_model

        return demo_model(ref.removeprefix(DEMO_SCHEME), log=lambda line: print(line, file=sys.stderr))
    path = Path(ref).expanduser()
    return path if path.is_absolute() else (base_dir / path)
