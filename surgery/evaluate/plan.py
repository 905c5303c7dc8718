"""A plan's `evaluate:` section: validated with the plan, run after `apply`, recorded with the output."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.card import write_card
from surgery.devices import check_device_name
from surgery.errors import SurgeryError
from surgery.evaluate.data import load_text
from surgery.evaluate.loading import DTYPES, require_causal_lm
from surgery.plan.schema import EvaluateSection, Plan
from surgery.provenance import PROVENANCE_NAME, read_provenance, write_json

if TYPE_CHECKING:
    from surgery.evaluate.run import EvalReport, EvalSettings
    from surgery.planner import Recipe


def reference_model(plan: Plan, resolve: Any, primary: Path) -> Path:
    """`compare_to`: `model` is the plan's input model, `base` its `base:`, anything else a path."""
    section = plan.evaluate
    assert section is not None
    if section.compare_to == "model":
        return primary
    if section.compare_to == "base":
        if plan.base is None:
            raise SurgeryError("evaluate.compare_to: base needs a 'base:' model at the top of the plan")
        return resolve(plan.base)
    return resolve(section.compare_to)


def validate(section: EvaluateSection, output_config: dict[str, Any], reference: Path) -> None:
    """Everything that can be checked before writing: names, files, and that the output has an LM head."""
    check_device_name(section.device)
    if section.dtype not in DTYPES:
        raise SurgeryError(f"evaluate.dtype: unknown dtype {section.dtype!r}; use {', '.join(DTYPES)}")
    for spec in section.data:
        load_text(spec)
    if section.window is not None and section.stride is not None and section.stride > section.window:
        raise SurgeryError(f"evaluate: stride {section.stride} is larger than window {section.window}")
    require_causal_lm(output_config, "the output")
    if not reference.is_dir():
        raise SurgeryError(f"evaluate.compare_to: {reference} does not exist")


def settings(section: EvaluateSection, device: str | None = None) -> EvalSettings:
    from surgery.evaluate.run import EvalSettings

    return EvalSettings(
        data=tuple(section.data), max_tokens=section.max_tokens, window=section.window, stride=section.stride,
        batch_size=section.batch_size, device=device or section.device, dtype=section.dtype,
    )


def record(output: Path, report: EvalReport) -> None:
    """Add the scores to the output's surgery.json."""
    data = read_provenance(output) or {}
    data["evaluation"] = report.to_dict()
    write_json(output / PROVENANCE_NAME, data)
    write_card(output)  # the card shows the scores too


def evaluate_output(recipe: Recipe, device: str = "auto") -> EvalReport:
    """After `apply`: score the output beside the plan's reference and record the scores with it.
    `device` other than auto overrides the section's."""
    from surgery.evaluate.run import evaluate

    section = recipe.plan.evaluate
    assert section is not None and recipe.evaluation_reference is not None
    report = evaluate(recipe.output, settings(section, None if device == "auto" else device),
                      compare=recipe.evaluation_reference)
    record(recipe.output, report)
    return report
