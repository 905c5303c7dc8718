"""One pipeline: resolve a plan, write its output, score it and record the scores, push it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from surgery.card import write_card
from surgery.plan.resolve import Recipe
from surgery.plan.schema import EvaluateSection
from surgery.provenance import PROVENANCE_NAME, read_provenance, write_json

if TYPE_CHECKING:
    from surgery.evaluation.run import EvalReport, EvalSettings


def eval_settings(section: EvaluateSection, device: str | None = None) -> EvalSettings:
    from surgery.evaluation.run import EvalSettings

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
    from surgery.evaluation.run import evaluate

    section = recipe.plan.evaluate
    assert section is not None and recipe.evaluation_reference is not None
    report = evaluate(recipe.output, eval_settings(section, None if device == "auto" else device),
                      compare=recipe.evaluation_reference)
    record(recipe.output, report)
    return report
