"""The example plans `surgery demo` applies: `plans/` of the repository, shipped as package data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def example_plans() -> list[Path]:
    """The plans in plans/: package data in an installed wheel, the folder itself in a checkout."""
    try:
        folder = Path(str(resources.files("surgery.example_plans")))
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "plans"
    return sorted(folder.glob("*.yaml"))
