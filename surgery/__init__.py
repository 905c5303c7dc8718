"""surgery: model surgery on Hugging Face checkpoints from declarative YAML plans.

The library is what the `surgery` command runs (docs/api.md has a worked example):

    import surgery

    plan = surgery.load_plan("plan.yaml")          # parse and validate, one error line for bad input
    recipe = surgery.check(plan)                   # resolve against the checkpoints; nothing written
    result = surgery.apply("plan.yaml")            # write (and score and push, as the plan says)
    report = surgery.evaluate(result.output, compare="./base")
    changes = surgery.diff("./base", result.output)
    summary = surgery.inspect(result.output)
    loaded = surgery.load_for_eval(result.output)  # any kind surgery writes, as a module and tokenizer

Names are imported on first use, so `import surgery` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from surgery.version import __version__

if TYPE_CHECKING:
    from surgery.comparison.report import DiffReport, diff
    from surgery.errors import SurgeryError
    from surgery.evaluation.loading import LoadedModel, load_for_eval
    from surgery.evaluation.run import EvalReport, EvalSettings, evaluate
    from surgery.formats.inspection import inspect
    from surgery.pipeline import Applied, Hooks, apply, check
    from surgery.plan.load import load_plan
    from surgery.plan.resolve import Recipe
    from surgery.plan.schema import Plan

_EXPORTS = {
    "load_plan": "surgery.plan.load", "Plan": "surgery.plan.schema", "check": "surgery.pipeline",
    "apply": "surgery.pipeline", "Applied": "surgery.pipeline", "Hooks": "surgery.pipeline",
    "Recipe": "surgery.plan.resolve", "diff": "surgery.comparison.report", "DiffReport": "surgery.comparison.report",
    "evaluate": "surgery.evaluation.run", "EvalSettings": "surgery.evaluation.run", "EvalReport": "surgery.evaluation.run",
    "inspect": "surgery.formats.inspection", "load_for_eval": "surgery.evaluation.loading",
    "LoadedModel": "surgery.evaluation.loading", "SurgeryError": "surgery.errors",
}
__all__ = [
    "Applied", "DiffReport", "EvalReport", "EvalSettings", "Hooks", "LoadedModel", "Plan", "Recipe", "SurgeryError",
    "__version__", "apply", "check", "diff", "evaluate", "inspect", "load_for_eval", "load_plan",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
