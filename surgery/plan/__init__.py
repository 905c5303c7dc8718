"""Plans: the YAML a user writes, validated into typed steps."""

from surgery.plan.load import load_plan
from surgery.plan.schema import ChainStep, LayerEntry, Plan

__all__ = ["ChainStep", "LayerEntry", "Plan", "load_plan"]
