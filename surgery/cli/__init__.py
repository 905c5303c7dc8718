"""The `surgery` command: one module per command, each parsing its arguments, calling the library
and rendering the result."""

from surgery.cli import analyze, apply, check, demo, diff, eval, gguf, inspect, materialize, push, verify  # noqa: F401
from surgery.cli.app import app, main

__all__ = ["app", "main"]
