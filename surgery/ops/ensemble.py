"""`ensemble`: models sharing a tokenizer, composed into one whose logits are the weighted mean of
theirs (`combine: logits`, the paper) or whose distribution is their mixture (`combine: probs`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, model_validator

from surgery.comparison.bytes import ByteComparer
from surgery.comparison.workers import Workers
from surgery.evaluation.models import require_causal_lm
from surgery.formats.ensemble_folder import (
    EnsembleSpec,
    Member,
    check_same_tokenizer,
    ensemble_config,
    member_hashes,
    member_name,
    vocab_size,
)
from surgery.ops.context import OpContext
from surgery.ops.fields import StepModel
from surgery.ops.registry import Op
from surgery.ops.vocabulary import MergeInput, check_one_vocabulary
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import ModelView, Storage


class EnsembleStep(StepModel):
    """One model whose next-token logits are the weighted mean of its members' (or, with combine: probs,
    whose distribution is the weighted mixture of theirs)."""

    op: Literal["ensemble"]
    members: list[str] = Field(min_length=1, description="Model folders sharing one tokenizer.")
    weights: list[float] | None = Field(default=None, description="One per member (default equal); normalised by their sum.")
    combine: Literal["logits", "probs"] = "logits"
    layout: Literal["reference", "copy"] = Field(
        default="reference", description="reference: members stay where they are (path and sha256); copy: copied in."
    )

    @model_validator(mode="after")
    def _weights(self) -> EnsembleStep:
        if self.weights is not None:
            if len(self.weights) != len(self.members):
                raise ValueError(f"{len(self.weights)} weights for {len(self.members)} members; give one weight per member")
            if sum(self.weights) <= 0:
                raise ValueError(f"weights sum to {sum(self.weights):g}; they must sum to a positive number")
            if self.combine == "probs" and min(self.weights) < 0:
                raise ValueError("combine: probs mixes distributions, so weights must not be negative")
        return self

    def starting_model(self) -> str | None:
        return self.members[0]

    def placement_error(self, index: int, steps: list[StepModel], plan_model: str | None) -> str | None:
        if len(steps) > 1:
            return "an ensemble combines whole models: it must be the plan's only step"
        if plan_model is not None:
            return "an ensemble takes its models from 'members'; leave 'model:' out"
        return None


def ensemble(step: EnsembleStep, view: ModelView, context: OpContext) -> ModelView:
    members = [context.open_model(ref) for ref in step.members]
    folders = [m.source.path for m in members]
    for member in members:
        require_causal_lm(member.config(), member.label)
    check_one_vocabulary("ensemble", [MergeInput(ref, m) for ref, m in zip(step.members, members)],
                         "members must share one vocabulary (an ensemble averages their logits token by token)")
    check_same_tokenizer(folders, step.members)  # and cut text alike
    weights = step.weights or [1.0] * len(members)
    stored: dict[str, TensorRecipe] = {}
    aliases: dict[str, str] = {}
    if step.layout == "copy":
        stored, aliases = _copied(members)
        entries = [Member(m.config()) for m in members]
    else:
        entries = [Member(m.config(), str(f.resolve()), member_hashes(f)) for m, f in zip(members, folders)]
    spec = EnsembleSpec(entries, [w / sum(weights) for w in weights], step.combine, step.layout, aliases)
    description = (f"ensemble of {len(members)} ({step.combine}, {step.layout}): "
                   + ", ".join(f"{ref} x{w:.3g}" for ref, w in zip(step.members, spec.weights)))
    storage = Storage(stored, ensemble_config(spec, vocab_size(members[0].config()) or 0), description)
    return replace(members[0], outside={}, layers=(), label="ensemble", storage=storage)


def _copied(members: list[ModelView]) -> tuple[dict[str, TensorRecipe], dict[str, str]]:
    """Every member's tensors under `members.{i}.`; one byte-identical to an earlier member's same-named
    tensor is stored once."""
    stored: dict[str, TensorRecipe] = {}
    aliases: dict[str, str] = {}
    with Workers() as workers:
        comparer = ByteComparer(workers)
        for index, member in enumerate(members):
            for name, recipe in member.tensors().items():
                twin = next((j for j in range(index) if _same_bytes(comparer, members[j].tensors().get(name), recipe)), None)
                if twin is None:
                    stored[member_name(index, name)] = recipe
                else:
                    aliases[member_name(index, name)] = aliases.get(member_name(twin, name), member_name(twin, name))
    return stored, aliases


def _same_bytes(comparer: ByteComparer, earlier: TensorRecipe | None, recipe: TensorRecipe) -> bool:
    if earlier is None or earlier.stored is None or recipe.stored is None:
        return False
    return comparer.identical(earlier.stored, recipe.stored)


def describe(step: EnsembleStep) -> str:
    return (f"An ensemble of {', '.join(step.members)} combining {step.combine} "
            f"(`ensemble`, members by {step.layout}).")


OP = Op("ensemble", EnsembleStep, ensemble, describe,
        'Bochkov 2025, "Growing Transformers: Modular Composition and Layer-wise Expansion on a Frozen Substrate"',
        {"op": "ensemble", "members": ["./prose", "./code"]})
