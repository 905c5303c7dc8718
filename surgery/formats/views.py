"""Open any checkpoint surgery reads as the view of the model it stands for."""

from __future__ import annotations

from typing import Any

from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.formats.ensemble_folder import is_ensemble
from surgery.formats.recursive import compact_view, is_compact
from surgery.formats.trit_planes import is_trit_planes, trit_view
from surgery.recipe.view import ModelView, standard_view


def open_view(checkpoint: Checkpoint, label: str, stack: str | None = None) -> ModelView:
    """The identity view of a checkpoint: every tensor a raw copy of itself (a compact recursive
    checkpoint: the L-layer model it stands for; trit-planes: their dense model), its layers those of `stack` (default: the language model)."""
    if is_compact(checkpoint.config):
        if stack is not None:
            raise SurgeryError(f"{checkpoint.path} is a compact recursive model: it has one stack; leave 'stack:' out")
        return compact_view(checkpoint, label)
    if is_trit_planes(checkpoint.config):
        if stack is not None:
            raise SurgeryError(f"{checkpoint.path} holds trit-planes of a language model; leave 'stack:' out")
        return trit_view(checkpoint, label)
    return standard_view(checkpoint, label, stack)


def cap_refusal(config: dict[str, Any], what: str) -> str | None:
    """Why a model cannot be scored under a memory cap (its weights are not the model transformers loads: a
    compact recursive, ensemble or trit-planes model), or None."""
    if is_compact(config) or is_ensemble(config) or is_trit_planes(config):
        return (f"{what}: a memory cap loads standard checkpoints only (this is a compact, ensemble or trit-planes model); score it without the cap, "
                "or materialize it first")
    return None
