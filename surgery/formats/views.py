"""Open any checkpoint surgery reads as the view of the model it stands for."""

from __future__ import annotations

from surgery.checkpoint.reader import Checkpoint
from surgery.formats.recursive import compact_view, is_compact
from surgery.recipe.view import ModelView, standard_view


def open_view(checkpoint: Checkpoint, label: str) -> ModelView:
    """The identity view of a checkpoint: every tensor a raw copy of itself (a compact recursive
    checkpoint: the L-layer model it stands for)."""
    if is_compact(checkpoint.config):
        return compact_view(checkpoint, label)
    return standard_view(checkpoint, label)
