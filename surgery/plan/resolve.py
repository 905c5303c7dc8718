"""Resolve a plan against the real checkpoints (headers only, plus the data its fits need) into a recipe.

The recipe is a value: every output tensor and how it is made, the output config, where it goes,
the sources it reads and what the fits found. `check` prints it; `apply` writes it. Everything that
can be checked before writing is checked here, the `evaluate:` section included.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from surgery.architecture.verify import UNCHANGED, Verification, verify
from surgery.checkpoint.blocks import STORED_DTYPES
from surgery.checkpoint.reader import FLOAT_DTYPES, Checkpoint
from surgery.checkpoint.writer import ShardPlan, plan_shards
from surgery.devices import check_device_name
from surgery.errors import SurgeryError
from surgery.evaluation.data import load_text
from surgery.evaluation.models import DTYPES, context_length, require_causal_lm
from surgery.formats.views import cap_refusal, open_view
from surgery.ops.context import OpContext
from surgery.ops.registry import op_of
from surgery.plan.load import plan_line, read_plan
from surgery.plan.mergekit import Translation
from surgery.plan.references import expand_user, hub_origin, resolve_model_path
from surgery.plan.schema import EvaluateSection, Plan
from surgery.recipe.tensor import TensorRecipe
from surgery.recipe.view import LayerOrigin, ModelView
from surgery.version import __version__


@dataclass(frozen=True)
class Recipe:
    """A resolved plan: the output view, where it goes, the sources it reads, what its fits found."""

    plan: Plan
    plan_path: Path | None  # None for a plan built in code
    output: Path
    view: ModelView
    sources: dict[str, Checkpoint]
    fits: tuple[dict[str, Any], ...] = ()  # what data-dependent fits found, by step
    evaluation_reference: Path | None = None  # the model scored beside the output, when the plan evaluates
    verification: Verification = UNCHANGED
    plan_text: str | None = None  # the plan file as the user wrote it (comments too), for the card
    translation: Translation | None = None  # what a mergekit config was translated to

    @cached_property
    def tensors(self) -> dict[str, TensorRecipe]:
        """Every output tensor by name, in write order."""
        return self.view.written_tensors()

    @cached_property
    def config(self) -> dict[str, Any]:
        """The output's config.json."""
        return self.view.written_config()

    @property
    def description(self) -> str | None:
        """What a storage format says the output is, where its layer map does not tell it (an ensemble)."""
        return self.view.storage.description if self.view.storage is not None else None

    def layer_map(self) -> list[LayerOrigin]:
        return [layer.origin for layer in self.view.layers]

    def shards(self, max_shard_size: int | str) -> list[ShardPlan]:
        """No shards when nothing is stored (an ensemble by reference)."""
        return plan_shards(self.tensors, max_shard_size) if self.tensors else []

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())

    @cached_property
    def source_records(self) -> dict[str, dict[str, Any]]:
        """Each source as surgery.json records it (its Hub origin looked up once)."""
        return {label: _source_record(ckpt) for label, ckpt in self.sources.items()}

    def provenance(self) -> dict[str, Any]:
        """What surgery.json records: enough to identify the inputs and re-run the edit, and the plan
        as written (the card shows it; `plan` is what it resolved to, defaults filled in)."""
        return {
            "surgery_version": __version__,
            "plan": self.plan.model_dump(mode="json", exclude_none=True, by_alias=True),
            **({"plan_file": str(self.plan_path)} if self.plan_path is not None else {}),
            **({"plan_text": self.plan_text} if self.plan_text is not None else {}),
            **({"translated_from": "mergekit", "translated_plan": self.translation.plan,
                "translation_notes": list(self.translation.notes)} if self.translation is not None else {}),
            "sources": self.source_records,
            "source_model": str(self.view.source.path),
            **({"fits": list(self.fits)} if self.fits else {}),
            "layer_map": [str(origin) for origin in self.layer_map()],
            "structure": self.verification.note,
            "tensors": len(self.tensors),
            "bytes": self.total_bytes,
        }

    def summary(self, max_shard_size: int | str) -> dict[str, Any]:
        """What `check --json` prints: the record, where it goes, its shards, and how each tensor is made."""
        return self.provenance() | {
            "output": str(self.output),
            "shards": [{"file": s.filename, "tensors": len(s.names)} for s in self.shards(max_shard_size)],
            "recipe": [{"name": name, "dtype": r.dtype, "shape": list(r.shape), "from": r.describe()}
                       for name, r in self.tensors.items()],
        }


def resolve(plan: str | Path | Plan, output: str | Path | None = None, device: str = "auto",
            base_dir: str | Path | None = None, replacing: bool = True, resume: bool = False,
            max_memory: int | None = None) -> Recipe:
    """Open a plan's checkpoints' headers, run its data-dependent fits (on `device`, at most `max_memory`
    bytes of weights there) and its ops into one view, and check everything that can be checked before
    writing.

    `plan` is a plan file (its paths are relative to its folder) or a Plan built in code (paths
    relative to `base_dir`, default the current folder); `output` overrides the plan's `output`.
    Without `replacing` (apply without --force or --resume), an output that exists is refused before
    any fit runs. `resume` continues a fit interrupted before (heal's last checkpoint).
    """
    translation: Translation | None = None
    if isinstance(plan, Plan):
        plan_path, plan_text, where, folder = None, None, "plan", Path(base_dir or Path.cwd()).resolve()
    else:
        plan_path = Path(plan)
        where, folder = str(plan_path), plan_path.resolve().parent
        read = read_plan(plan_path)
        plan, plan_text, translation = read.plan, read.text, read.translation
        if translation is not None:
            folder = Path.cwd().resolve()  # mergekit reads a config's paths from where it runs
    views: dict[str, ModelView] = {}
    sources: dict[str, Checkpoint] = {}

    def open_model(ref: str) -> ModelView:
        if ref not in views:
            checkpoint = Checkpoint.open(resolve_model_path(ref, folder))
            sources[ref] = checkpoint
            views[ref] = open_view(checkpoint, label=ref, stack=plan.stack)
        return views[ref]

    primary = plan.starting_model()
    if primary is None:
        raise SurgeryError(f"{where}: the plan names no model; add 'model: PATH' at the top")
    if translation is not None and output is None:
        raise SurgeryError(f"{where}: a mergekit config names no output folder; pass --out")
    out = _output_folder(plan, output, folder, where)
    if not replacing and (out.exists() or out.is_symlink()):
        raise SurgeryError(f"output {out} already exists; pass --force to replace it")
    lines = plan_path is not None and translation is None  # a translated plan's places are not the file's lines
    with _located(plan_path, ("model",) if plan.model else ("steps", 0), lines):
        view = open_model(primary)
    context = OpContext(open_model, plan.base, device, log=lambda line: print(line, file=sys.stderr),
                        start_ref=primary, folder=folder, resume=resume, max_memory=max_memory)
    if translation is not None:
        for note in translation.notes:
            context.log(f"note: {note}")
        with _located(plan_path, (), lines):
            check_translation(translation, open_model)
    fits: list[dict[str, Any]] = []
    for index, step in enumerate(plan.steps):
        with _located(plan_path, ("steps", index), lines):
            view = op_of(step).build(step, view, context)
        fits.extend({"step": index, "op": step.op, **found} for found in context.fits)
        context.fits.clear()
    if translation is not None and translation.stored_dtype is not None:
        _check_stored_dtype(view, translation.stored_dtype, where)
    verification = verify(view, views)
    for checkpoint in sources.values():
        if _overlaps(checkpoint.path, out):
            raise SurgeryError(
                f"output {out} overlaps the input model {checkpoint.path}; inputs are never modified, pick another --out"
            )
    if plan.evaluate is None:
        return Recipe(plan, plan_path, out, view, sources, tuple(fits), verification=verification, plan_text=plan_text,
                      translation=translation)
    data = [spec if spec.startswith("builtin") or Path(spec).is_absolute() else str(folder / spec)
            for spec in plan.evaluate.data]  # relative to the plan's folder, as every path in it
    plan = plan.model_copy(update={"evaluate": plan.evaluate.model_copy(update={"data": data})})
    reference = _reference_model(plan, plan.evaluate, lambda ref: resolve_model_path(ref, folder), view.source.path)
    if _overlaps(reference, out):
        raise SurgeryError(f"evaluate.compare_to: {reference} overlaps the output {out}: the output would be scored "
                           "beside itself; name another model to compare it to")
    recipe = Recipe(plan, plan_path, out, view, sources, tuple(fits), reference, verification, plan_text, translation)
    _check_evaluation(plan.evaluate, recipe.config, reference, max_memory)
    return recipe


@contextmanager
def _located(plan_path: Path | None, loc: tuple[Any, ...], lines: bool = True) -> Iterator[None]:
    """An error of this part of the plan file names the file and line it comes from (the file only, for a
    translated mergekit config)."""
    try:
        yield
    except SurgeryError as e:
        if plan_path is None or str(e).startswith(f"{plan_path}:"):
            raise
        where = f"{plan_path}:{plan_line(plan_path, loc)}" if lines else f"{plan_path}: mergekit config"
        raise type(e)(f"{where}: {e}") from None


def check_translation(translation: Translation, open_model: Any) -> None:
    """What a mergekit config's translation leaves to the models: a merge's slice covers every layer."""
    for ref, stop in translation.whole_models.items():
        layers = len(open_model(ref).layers)
        if stop != layers:
            raise SurgeryError(f"slices: layer_range [0, {stop}] of {ref}, which has {layers} layers: surgery merges "
                               f"whole models; give [0, {layers}] and drop layers with a chain plan after")


def _check_stored_dtype(view: ModelView, dtype: str, where: str) -> None:
    """A passthrough's chain copies tensors as they are: a dtype it would have to change is refused."""
    stored = STORED_DTYPES[dtype]
    for name, recipe in view.tensors().items():
        if recipe.dtype in FLOAT_DTYPES and recipe.dtype != stored:
            raise SurgeryError(f"{where}: mergekit config: dtype {dtype}: {name} is {recipe.dtype}, and surgery's chain "
                               f"copies tensors as they are; leave dtype out, or convert the models first")


def _source_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """A source in surgery.json: its folder and header hashes, and its Hub id and commit where it is one."""
    origin = hub_origin(checkpoint.path)
    hub = {"hub_id": origin.repo, "revision": origin.commit} if origin else {}
    return {"path": str(checkpoint.path), "header_sha256": checkpoint.header_hashes, **hub}


def _overlaps(model: Path, out: Path) -> bool:
    try:
        source, target = model.resolve(), out.resolve()
    except RuntimeError:  # a symlink loop on the way
        raise SurgeryError(f"{out}: cannot resolve the path (a link on the way leads back to itself)") from None
    return target == source or source.is_relative_to(target) or target.is_relative_to(source)


def _output_folder(plan: Plan, output: str | Path | None, folder: Path, where: str) -> Path:
    if output is not None:
        return expand_user(str(output))
    if plan.output is None:
        raise SurgeryError(f"{where}: no output folder; add 'output: PATH' to the plan or pass --out")
    out = expand_user(plan.output)
    return out if out.is_absolute() else (folder / out).resolve()


def _reference_model(plan: Plan, section: EvaluateSection, resolve_ref: Any, primary: Path) -> Path:
    """`compare_to`: `model` is the plan's input model, `base` its `base:`, anything else a path."""
    if section.compare_to == "model":
        return primary
    if section.compare_to == "base":
        if plan.base is None:
            raise SurgeryError("evaluate.compare_to: base needs a 'base:' model at the top of the plan")
        return resolve_ref(plan.base)
    return resolve_ref(section.compare_to)


def _check_evaluation(section: EvaluateSection, output_config: dict[str, Any], reference: Path,
                      max_memory: int | None) -> None:
    """Everything about scoring that can be checked before writing: names, files, an LM head, and that
    the models can load under the memory cap (`max_memory`, from the command line, or the section's)."""
    check_device_name(section.device)
    if section.dtype not in DTYPES:
        raise SurgeryError(f"evaluate.dtype: unknown dtype {section.dtype!r}; use {', '.join(DTYPES)}")
    for spec in section.data:
        load_text(spec)
    if section.window is not None and section.stride is not None and section.stride > section.window:
        raise SurgeryError(f"evaluate: stride {section.stride} is larger than window {section.window}")
    context = context_length(output_config)
    if section.window is not None and context is not None and section.window > context:
        raise SurgeryError(f"evaluate.window: {section.window} is longer than the output's context of {context} tokens; "
                           f"give {context} or less")
    require_causal_lm(output_config, "the output")
    if not reference.is_dir():
        raise SurgeryError(f"evaluate.compare_to: {reference} does not exist")
    if max_memory is not None or section.max_memory is not None:
        from surgery.checkpoint.reader import read_config

        cap = "--max-memory" if max_memory is not None else "evaluate.max_memory"
        for config, what in ((output_config, f"{cap}: the output"),
                             (read_config(reference), f"{cap}: the reference {reference}")):
            refusal = cap_refusal(config, what)
            if refusal is not None:
                raise SurgeryError(refusal)
