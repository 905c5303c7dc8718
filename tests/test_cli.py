"""The command line as users meet it: help, version, check, inspect, demo."""

from __future__ import annotations

import json

import pytest

from surgery import __version__
from tests.conftest import ARCHS, listing, write_plan

COMMANDS = ["analyze", "apply", "check", "demo", "diff", "eval", "gguf", "inspect", "materialize", "push", "verify"]


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and __version__ in result.out


def test_every_command_is_listed_here():
    from surgery.cli import app

    registered = {info.name or info.callback.__name__.replace("_", "-") for info in app.registered_commands}
    assert registered == set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(cli, command):
    result = cli(*([command] if command else []), "--help")
    assert result.code == 0
    assert "Usage" in result.out


def test_check_prints_what_would_be_written_and_writes_nothing(tiny, cli, tmp_path):
    plan = write_plan(tmp_path, f"model: {tiny('llama')}\noutput: out\nsteps:\n  - op: chain\n    layers: [0-2, 2, 5]\n")
    before = listing(tmp_path)
    result = cli("check", plan)
    assert result.code == 0, result.err
    assert "tiny-llama[0-2]" in result.out and "tiny-llama[2]" in result.out and "tiny-llama[5]" in result.out
    assert "5 layers" in result.out and "tensors" in result.out and "model.safetensors" in result.out
    assert listing(tmp_path) == before
    data = json.loads(cli("check", plan, "--json", "--shard-size", "100KB").out)
    assert len(data["layer_map"]) == 5 and data["tensors"] == 3 + 5 * 9 and len(data["shards"]) > 1
    recipe = {entry["name"]: entry["from"] for entry in data["recipe"]}
    assert recipe["model.layers.3.mlp.up_proj.weight"] == "copy tiny-llama/model.layers.2.mlp.up_proj.weight"


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect(arch, tiny, cli):
    from surgery.demo_models.models import TINY_LAYERS

    data = json.loads(cli("inspect", tiny(arch), "--json").out)
    assert data["layers"] == TINY_LAYERS
    assert data["parameters"] > 0 and data["bytes"] == 4 * data["parameters"]
    assert all(group["layers"] == TINY_LAYERS for group in data["layer_groups"])
    text = cli("inspect", tiny(arch))
    assert text.code == 0 and "layer tensors" in text.out


def test_demo_runs_every_example_plan(cli, tmp_path):
    """Every plan in plans/ runs as written against the demo models (validated, applied, scored)."""
    from surgery.demo_models import example_plans

    result = cli("demo", "--out-dir", tmp_path)
    assert result.code == 0, result.err
    for plan in example_plans():
        assert (tmp_path / plan.stem / "config.json").exists()  # an ensemble by reference stores no weights
        assert plan.stem in result.out
    out = " ".join(result.out.split())  # what each plan did is wrapped to the terminal, never cut off
    assert "ensemble of 2 (logits, reference)" in out and "…" not in out


def test_every_subpackage_is_in_the_distribution():
    """pyproject lists packages explicitly (plans/ ships as surgery.example_plans): none may be missed."""
    from tests.conftest import REPO

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "surgery").rglob("__init__.py")}
    assert found <= listed, f"missing from pyproject: {sorted(found - listed)}"
