"""One pipeline: resolve a plan, write its output, score it beside its reference and record the
scores with it (surgery.json and the card), push it. The CLI, `surgery demo` and analyze's
suggestions all run plans through `apply`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.plan.resolve import Recipe, resolve
from surgery.plan.schema import Plan, PushSection

if TYPE_CHECKING:
    from surgery.evaluation.gates import GateResult
    from surgery.evaluation.run import EvalReport, Phase
    from surgery.hub import PushResult
    from surgery.output.execute import Written


def _ignore(*args: object) -> None:
    return None


@contextmanager
def _no_progress(recipe: Recipe) -> Iterator[Callable[[int], None]]:
    yield _ignore


@dataclass(frozen=True)
class Hooks:
    """What a caller hears while `apply` runs (each hook optional): log lines, each long phase while it
    runs (checking the plan, scoring a model: a context manager given its description), bytes written (the
    progress hook gets the recipe and gives the callback told of each write), the written output
    (recipe, folder, seconds), the scores."""

    log: Callable[[str], None] = _ignore
    phase: Phase = nullcontext
    progress: Callable[[Recipe], AbstractContextManager[Callable[[int], None]]] = _no_progress
    written: Callable[[Recipe, Path, float], None] = _ignore
    evaluated: Callable[[EvalReport], None] = _ignore


@dataclass(frozen=True)
class Applied:
    """What `apply` did: the recipe, the output folder, seconds spent writing, scores, the push."""

    recipe: Recipe
    output: Path
    seconds: float
    evaluation: EvalReport | None = None
    pushed: PushResult | None = None


def check(plan: str | Path | Plan, *, out: str | Path | None = None, device: str = "auto",
          base_dir: str | Path | None = None, max_memory: int | str | None = None) -> Recipe:
    """Validate a plan against the real checkpoints and return what `apply` would write.

    Args: `plan` is a plan file or a Plan (its relative paths against `base_dir`); `out` overrides
    its `output`; `device` runs the data-dependent fits, with at most `max_memory` (bytes, or a size
    such as "20GB") of a model's weights on it. Returns the Recipe: every output tensor and how it is
    made, the config, the shards (`.summary(shard_size)` is what `check --json` prints).
    Raises SurgeryError on any bad input.
    """
    return _checked(resolve(plan, out, device, base_dir, max_memory=_cap(max_memory)))


def _cap(max_memory: int | str | None) -> int | None:
    from surgery.formatting import memory_bytes

    return None if max_memory is None else memory_bytes(str(max_memory), "max_memory")


def _checked(recipe: Recipe) -> Recipe:
    """What resolving the plan leaves to the output's side: the source's side files it will copy
    (a link out of the model folder is refused here, before anything is written)."""
    from surgery.output.side_files import side_files

    side_files(recipe.view.source.path)
    return recipe


def apply(plan: str | Path | Plan, *, out: str | Path | None = None, force: bool = False, resume: bool = False,
          device: str = "auto", shard_size: int | str = "5GB", fsync: bool = True, push_to: str | None = None,
          base_dir: str | Path | None = None, max_memory: int | str | None = None, hooks: Hooks = Hooks()) -> Applied:
    """Validate a plan, stream its edit into the output folder, score it when the plan has an
    `evaluate:` section (recording the scores in surgery.json and the card), and push it when the
    plan has a `push:` section or `push_to` names a repo.

    Args: as `check`, and `force` replaces an existing output, `resume` continues an interrupted run,
    `shard_size` bounds each shard, `fsync` flushes the output to disk before it appears, `max_memory`
    caps the fits' and the scoring's models (over the evaluate section's own cap).
    Returns an Applied; raises SurgeryError (exit code 2: bad input; others: see output/execute.py).
    """
    from surgery.output.execute import execute

    cap = _cap(max_memory)
    with hooks.phase("checking the plan against the checkpoints"):
        recipe = _checked(resolve(plan, out, device, base_dir, replacing=force or resume, resume=resume,
                                  max_memory=cap))
    target = _push_target(recipe, push_to)
    if target is not None:
        from surgery.hub import ready_to_push

        ready_to_push(target.repo)  # before the work, not after it
    start = time.perf_counter()
    with hooks.progress(recipe) as advance:
        written = execute(recipe, force=force, resume=resume, max_shard_size=shard_size, device=device, fsync=fsync,
                          on_bytes=advance, log=hooks.log)
    seconds = time.perf_counter() - start
    if not written.already_complete:
        hooks.written(recipe, written.folder, seconds)
    report = None
    if recipe.plan.evaluate is not None:
        try:
            report, gates = _evaluate(recipe, written, device, cap, hooks.phase)
        except KeyboardInterrupt:
            from surgery.output.execute import Interrupted

            raise Interrupted(f"interrupted while scoring; the output {written.folder} is complete and kept, not yet "
                              "scored: run the same command with --resume to score it (nothing is written again)"
                              ) from None
        hooks.evaluated(report)
        if gates is not None and gates.passed:
            hooks.log("quality gates passed: " + ", ".join(f"{k} {v:.4g}" for k, v in gates.measured.items()))
        elif gates is not None:
            from surgery.evaluation.gates import QualityGatesMissed

            raise QualityGatesMissed(f"quality gates missed: {'; '.join(gates.missed)}; the output {written.folder} is "
                                     "kept, records it (surgery.json, README.md), and is not pushed")
    pushed = None
    if target is not None:
        from surgery.hub import push

        pushed = push(written.folder, target.repo, private=target.private, revision=target.revision)
    return Applied(recipe, written.folder, seconds, report, pushed)


def materialize_plan(compact: Path) -> Plan:
    """The plan `surgery materialize` runs: a compact recursive or trit-plane model written as a standard
    checkpoint."""
    from surgery.checkpoint.reader import read_config
    from surgery.errors import SurgeryError
    from surgery.formats.recursive import is_compact
    from surgery.formats.trit_planes import is_trit_planes
    from surgery.ops.materialize import MaterializeStep

    config = read_config(compact)
    if not is_compact(config) and not is_trit_planes(config):
        raise SurgeryError(f"{compact} is neither a compact recursive model nor trit-planes (its config.json has no "
                           "surgery_recursive or surgery_trit_planes section)")
    return Plan(model=str(compact.resolve()), steps=[MaterializeStep(op="materialize")])


def _push_target(recipe: Recipe, push_to: str | None) -> PushSection | None:
    """Where the output goes: the plan's `push:` section, its repo replaced by `push_to` when given."""
    section = recipe.plan.push
    if push_to is None:
        return section
    return PushSection(repo=push_to) if section is None else section.model_copy(update={"repo": push_to})


def _evaluate(recipe: Recipe, written: Written, device: str, max_memory: int | None,
              phase: Phase) -> tuple[EvalReport, GateResult | None]:
    """Score the output beside the plan's reference, measure its quality gates, and record both with it;
    `device` other than auto, and a `max_memory` given, override the section's."""
    from surgery.evaluation.run import EvalSettings, evaluate
    from surgery.output.provenance import write_record

    section = recipe.plan.evaluate
    assert section is not None and recipe.evaluation_reference is not None
    settings = EvalSettings(data=tuple(section.data), max_tokens=section.max_tokens, window=section.window,
                            stride=section.stride, batch_size=section.batch_size,
                            device=section.device if device == "auto" else device, dtype=section.dtype,
                            max_memory=section.memory_cap() if max_memory is None else max_memory)
    report = evaluate(written.folder, settings, compare=recipe.evaluation_reference, phase=phase)
    record = {"evaluation": report.to_dict()}
    gates, limits = None, section.limits.set() if section.limits is not None else {}
    if limits:
        from surgery.evaluation.gates import measure_gates

        with phase("checking the quality gates"):
            gates = measure_gates(limits, report, written.folder, Path(recipe.evaluation_reference), settings)
        record["quality_gates"] = gates.to_dict()
    write_record(written.folder, written.provenance | record, recipe.config)
    return report, gates
