"""The example plans `surgery demo` applies: `plans/` of the repository, shipped as package data, and
the same plans fitted to a user's own model (`surgery demo --model`)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEMO_BASE = "demo:base"
# The single-model chain examples' layer lists, written for the demo base's 8 layers, as rules of the
# depth n: on n = 8 each gives the example's own list.
DEPTH_RULES: dict[str, Callable[[int], list[int | str]]] = {
    "drop-late-layers": lambda n: [f"0-{n - 4}", n - 1],  # the two layers before the last dropped
    "loop-middle": lambda n: [f"0-{3 * n // 4 - 1}", f"{n // 4}-{n - 1}"],  # the middle half run twice
    "reorder": lambda n: [f"0-{n // 2 - 2}", n // 2, n // 2 - 1, f"{n // 2 + 1}-{n - 1}"],  # two middle layers swapped
}
MIN_DEPTH = 4


def example_plans() -> list[Path]:
    """The plans in plans/: package data in an installed wheel, the folder itself in a checkout."""
    try:
        folder = Path(str(resources.files("surgery.example_plans")))
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "plans"
    return sorted(folder.glob("*.yaml"))


def fitted_plan(example: Path, model: str, depth: int, output: Path, scored: bool = True) -> dict[str, Any] | str:
    """The example plan run on `model` (of `depth` layers) instead of the demo base, writing `output`
    (without its `evaluate:` section when the model cannot be scored: no language-model head); or why
    it cannot be (it needs the demo's fine-tunes, or more layers)."""
    plan = yaml.safe_load(example.read_text(encoding="utf-8"))
    named = _demo_names(plan)
    if plan.get("base") or named - {DEMO_BASE}:
        return "needs several models fine-tuned from one base, as the demo models are"
    steps = plan["steps"]
    if example.stem in DEPTH_RULES:
        if depth < MIN_DEPTH:
            return f"its layer list needs at least {MIN_DEPTH} layers; the model has {depth}"
        steps = [{**steps[0], "layers": DEPTH_RULES[example.stem](depth)}, *steps[1:]]
    fitted = {**plan, "model": model, "output": str(output), "steps": steps}
    return fitted if scored else {k: v for k, v in fitted.items() if k != "evaluate"}


def summary(plan: Path) -> str:
    """What a plan does, in its own words: the first sentence of the comment it starts with."""
    lines = []
    for line in plan.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    return text.split(". ")[0].rstrip(".") if text else ""


def _demo_names(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value} if value.startswith("demo:") else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(*(_demo_names(v) for v in value))
    return set()
