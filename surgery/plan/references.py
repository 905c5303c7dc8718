"""Model references in plans: folders (relative to the plan) and `demo:NAME` demo models."""

from __future__ import annotations

import sys
from pathlib import Path

from surgery.errors import SurgeryError

DEMO_SCHEME = "demo:"


def resolve_model_path(ref: str, base_dir: Path) -> Path:
    """A model reference to a folder: paths are relative to `base_dir`; `demo:NAME` is a demo model."""
    if ref.startswith(DEMO_SCHEME):
        from surgery.demo_models import demo_model

        return demo_model(ref.removeprefix(DEMO_SCHEME), log=lambda line: print(line, file=sys.stderr))
    path = expand_user(ref)
    return path if path.is_absolute() else (base_dir / path)


def expand_user(ref: str) -> Path:
    """`~` and `~user` expanded; a user the system does not know is one line, not a traceback."""
    try:
        return Path(ref).expanduser()
    except RuntimeError:
        raise SurgeryError(f"{ref}: cannot expand {ref.split('/')[0]} (no such user, or no home folder); "
                           "write the path out in full") from None
