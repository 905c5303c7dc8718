"""The op registry: every op is one registered unit, described for the card and in the docs."""

from __future__ import annotations

import typing

import pytest

from surgery.ops.registry import registry
from surgery.plan.schema import Plan
from tests.conftest import REPO

OPS = sorted(registry())


def test_the_registry_holds_every_op_module():
    """An op module without `OP` (or a family's `OPS`), or an `OP` named unlike its module, would be missed
    or misfiled."""
    import importlib

    modules = {p.stem for p in (REPO / "surgery" / "ops").glob("*.py")}
    helpers = {"__init__", "registry", "fields", "context", "task_vectors", "atlas_learn", "fit_memo", "varying",
               "vocabulary", "gptq_layers", "heal_train"}
    found = set()
    for module in sorted(modules - helpers):
        loaded = importlib.import_module(f"surgery.ops.{module}")
        if hasattr(loaded, "OP"):
            assert loaded.OP.name == module
        family = {op.name for op in getattr(loaded, "OPS", ())}
        assert hasattr(loaded, "OP") or family, f"surgery/ops/{module}.py registers no op"
        found |= family | ({loaded.OP.name} if hasattr(loaded, "OP") else set())
    assert set(OPS) == found


@pytest.mark.parametrize("name", OPS)
def test_each_op_is_one_unit(name):
    op = registry()[name]
    assert typing.get_args(op.step.model_fields["op"].annotation) == (name,)
    step = op.step.model_validate(op.example)
    sentence = op.describe(step)
    assert f"`{name}`" in sentence and sentence.endswith(".")  # a sentence of its own, not a fallback
    assert op.paper.strip(), f"{name} names no paper or reference"


@pytest.mark.parametrize("name", OPS)
def test_each_op_has_a_section_in_the_plan_reference(name):
    headings = [line for line in (REPO / "docs" / "plans.md").read_text().splitlines() if line.startswith("#")]
    assert any(f"`op: {name}`" in line for line in headings), f"docs/plans.md has no section for `op: {name}`"


def test_the_plan_accepts_exactly_the_registered_ops():
    for name in OPS:
        example = registry()[name].example
        plan = Plan.model_validate({"model": None if name == "ensemble" else "m", "steps": [example]})
        assert type(plan.steps[0]) is registry()[name].step
