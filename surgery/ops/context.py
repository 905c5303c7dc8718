"""What an op may use beyond its step and input view: other models, the plan's base, where fits run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.recipe.view import ModelView


@dataclass
class OpContext:
    """Opens models by reference (each once), names the plan's `base:` and starting model, resolves its
    data files against the plan's folder, and collects what data-dependent fits found (learned
    coefficients, fitted scales) for surgery.json. `resume` continues a fit interrupted before (heal).
    `max_memory` caps the bytes of weights a fit's model holds on its device (the rest wait on disk)."""

    open_model: Callable[[str], ModelView]
    base_ref: str | None = None
    device: str = "auto"
    log: Callable[[str], None] = lambda line: None
    fits: list[dict[str, Any]] = field(default_factory=list)
    start_ref: str | None = None
    folder: Path | None = None
    resume: bool = False
    max_memory: int | None = None

    def refuse_cap(self, op: str, why: str) -> None:
        """A fit that cannot keep to a memory cap refuses it, before anything is written."""
        if self.max_memory is not None:
            raise SurgeryError(f"{op}: {why}, so it cannot keep to --max-memory; run this plan without it")

    def data_path(self, spec: str) -> str:
        """A plan's `data:` entry as load_text reads it: built-in names as they are, files relative to the plan."""
        if spec.startswith("builtin") or self.folder is None or Path(spec).is_absolute():
            return spec
        return str(self.folder / spec)

    def base(self, op: str) -> ModelView:
        if self.base_ref is None:
            raise SurgeryError(f"{op} needs the pretrained model the fine-tunes started from: add 'base: PATH' to the plan")
        return self.open_model(self.base_ref)
