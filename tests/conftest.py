"""Shared fixtures: the project's own tiny models (built once per cache), and a CLI runner."""

from __future__ import annotations

import os

# huggingface_hub reads this once, at import, so before anything imports it: the fake Hub of
# test_hub.py speaks the LFS upload protocol, not Xet.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from surgery.demo_models import demo_model
from surgery.demo_models.models import tiny_configs

ARCHS = list(tiny_configs())
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    """tiny(arch) -> folder of the random-weight checkpoint of that architecture."""
    return lambda arch: demo_model(f"tiny-{arch}")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the `surgery` entry point in-process, as a user would from a shell."""
    from surgery.cli import main

    def run(*args: object) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["surgery", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        capsys.readouterr()  # only what this command prints counts
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def write_plan(folder: Path, text: str, name: str = "plan.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def outputs_on_devices(cli, tmp_path: Path, body: str) -> dict[str, dict]:
    """Apply one plan (`body`: everything but `output:`) with --device cpu and --device cuda; each output's tensors."""
    from safetensors.torch import load_file

    tensors = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        plan = write_plan(tmp_path, f"output: {out}\n{body}", f"{device}.yaml")
        result = cli("apply", plan, "--device", device)
        assert result.code == 0, result.err
        tensors[device] = load_file(out / "model.safetensors")
    return tensors


def assert_plan_refused(cli, folder: Path, text: str, message: str) -> None:
    """`surgery apply` of this plan fails as bad input should: exit 2, one line naming `message`,
    nothing written beside the plan."""
    plan = write_plan(folder, text)
    result = cli("apply", plan)
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert listing(folder) == [plan.name]


def copy_without_shards(source: Path, dest: Path) -> dict:
    """Copy a model folder, its weights taken out: the tensors returned, to be saved as a test needs."""
    from safetensors.torch import load_file

    shutil.copytree(source, dest)
    tensors = {}
    for shard in sorted(dest.glob("*.safetensors")):
        tensors |= load_file(shard)
        shard.unlink()
    (dest / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def listing(folder: Path) -> list[str]:
    """Everything under a folder (names relative to it), to assert that nothing was written."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # for the subprocesses tests start
