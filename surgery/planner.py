"""Resolve a plan against the real checkpoints (headers only) into a recipe.

The recipe is a value: the full list of output tensors with how to make each, the output config,
and provenance. `check` prints it; `apply` hands it to the executor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from surgery import __version__
from surgery.checkpoint.reader import Checkpoint
from surgery.checkpoint.writer import ShardPlan, plan_shards
from surgery.errors import SurgeryError
from surgery.formats.views import open_view
from surgery.ops.context import OpContext
from surgery.ops.registry import op_of
from surgery.plan.load import load_plan
from surgery.plan.schema import Plan
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import LayerOrigin, ModelView

DEMO_SCHEME = "demo:"


def resolve_model_path(ref: str, plan_dir: Path) -> Path:
    """A model reference to a folder: paths are relative to the plan file; `demo:NAME` is a demo model."""
    if ref.startswith(DEMO_SCHEME):
        from surgery.fixtures.demo import demo_model

        return demo_model(ref.removeprefix(DEMO_SCHEME), log=lambda line: print(line, file=sys.stderr))
    path = Path(ref).expanduser()
    return path if path.is_absolute() else (plan_dir / path)


@dataclass
class Recipe:
    """A resolved plan: the output view, where it goes, and the sources it reads."""

    plan: Plan
    plan_path: Path
    output: Path
    view: ModelView
    sources: dict[str, Checkpoint] = field(default_factory=dict)
    fits: list[dict[str, Any]] = field(default_factory=list)  # what data-dependent fits found, by step
    evaluation_reference: Path | None = None  # the model scored beside the output, when the plan evaluates

    @cached_property
    def tensors(self) -> dict[str, TensorRecipe]:
        """Every output tensor by name, in write order."""
        return self.view.written_tensors()

    @cached_property
    def config(self) -> dict[str, Any]:
        """The output's config.json."""
        return self.view.written_config()

    def layer_map(self) -> list[LayerOrigin]:
        return [layer.origin for layer in self.view.layers]

    def shards(self, max_shard_size: int | str) -> list[ShardPlan]:
        """No shards when nothing is stored (an ensemble by reference)."""
        return plan_shards(self.tensors, max_shard_size) if self.tensors else []

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())

    def provenance(self) -> dict[str, Any]:
        """What surgery.json records: enough to identify the inputs and re-run the edit."""
        return {
            "surgery_version": __version__,
            "plan": self.plan.model_dump(mode="json", exclude_none=True, by_alias=True),
            "plan_file": str(self.plan_path),
            "sources": {
                label: {"path": str(ckpt.path), "header_sha256": ckpt.header_hashes}
                for label, ckpt in self.sources.items()
            },
            "source_model": str(self.view.source.path),
            **({"fits": self.fits} if self.fits else {}),
            "layer_map": [str(origin) for origin in self.layer_map()],
            "tensors": len(self.tensors),
            "bytes": self.total_bytes,
        }


def resolve(plan_path: str | Path, output: str | Path | None = None, device: str = "auto") -> Recipe:
    """Load a plan, open its checkpoints' headers, run its data-dependent fits (on `device`), and run
    its ops into one view."""
    plan_path = Path(plan_path)
    return resolve_plan(load_plan(plan_path), plan_path, output, device)


def resolve_plan(plan: Plan, plan_path: Path, output: str | Path | None = None, device: str = "auto") -> Recipe:
    """`resolve` for a plan already loaded (or built by a command); paths are relative to `plan_path`'s folder."""
    plan_dir = plan_path.resolve().parent
    views: dict[str, ModelView] = {}
    sources: dict[str, Checkpoint] = {}

    def open_model(ref: str) -> ModelView:
        if ref not in views:
            checkpoint = Checkpoint.open(resolve_model_path(ref, plan_dir))
            sources[ref] = checkpoint
            views[ref] = open_view(checkpoint, label=ref)
        return views[ref]

    primary = plan.starting_model()
    if primary is None:
        raise SurgeryError(f"{plan_path}: the plan names no model; add 'model: PATH' at the top")
    view = open_model(primary)
    context = OpContext(open_model, plan.base, device, log=lambda line: print(line, file=sys.stderr))
    fits: list[dict[str, Any]] = []
    for index, step in enumerate(plan.steps):
        view = op_of(step).build(step, view, context)
        fits.extend({"step": index, "op": step.op, **found} for found in context.fits)
        context.fits.clear()

    if output is not None:
        out = Path(output)
    elif plan.output is not None:
        out = Path(plan.output).expanduser()
        out = out if out.is_absolute() else (plan_dir / out).resolve()
    else:
        raise SurgeryError(f"{plan_path}: no output folder; add 'output: PATH' to the plan or pass --out")
    for checkpoint in sources.values():
        source = checkpoint.path.resolve()
        target = out.resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise SurgeryError(
                f"output {out} overlaps the input model {checkpoint.path}; inputs are never modified, pick another --out"
            )
    recipe = Recipe(plan=plan, plan_path=plan_path, output=out, view=view, sources=sources, fits=fits)
    if plan.evaluate is not None:
        from surgery.evaluate import plan as evaluate_plan

        reference = evaluate_plan.reference_model(plan, lambda ref: resolve_model_path(ref, plan_dir), view.source.path)
        evaluate_plan.validate(plan.evaluate, recipe.config, reference)
        recipe.evaluation_reference = reference
    return recipe
