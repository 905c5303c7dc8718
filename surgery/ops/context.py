"""What an op may use beyond its step and input view: other models, the plan's base, where fits run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import SurgeryError
from surgery.recipe.view import ModelView


@dataclass
class OpContext:
    """Opens models by reference (each once), names the plan's `base:`, and collects what data-dependent
    fits found (learned coefficients, fitted scales) for surgery.json."""

    open_model: Callable[[str], ModelView]
    base_ref: str | None = None
    device: str = "auto"
    log: Callable[[str], None] = lambda line: None
    fits: list[dict[str, Any]] = field(default_factory=list)

    def base(self, op: str) -> ModelView:
        if self.base_ref is None:
            raise SurgeryError(f"{op} needs the pretrained model the fine-tunes started from: add 'base: PATH' to the plan")
        return self.open_model(self.base_ref)
