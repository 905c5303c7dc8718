"""Ops: pure functions from (resolved step, input view, context) to an output view, one module each.

Each op module defines `OP` (surgery/ops/registry.py); the planner applies them in plan order.
"""
