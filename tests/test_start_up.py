"""What a run skips at start-up, where its cost would dominate the edit of a small model: a structure
check that passed before on the same inputs (remembered, never a refusal), and torch itself for a
merge the fused kernel computes on a machine with no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import surgery.architecture.verify as verify
from surgery.compute import fused
from surgery.devices import _may_have_cuda
from surgery.errors import SurgeryError
from tests.conftest import write_plan

HEAVY = {"torch", "transformers"}
SCRIPT = ("import sys\nfrom surgery.cli import main\nsys.argv[0] = 'surgery'\n"
          "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}), file=sys.stderr)")


def _run(cache: Path, *args: object) -> list[str]:
    """The heavy libraries a `surgery` command in a fresh process loaded."""
    result = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "SURGERY_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stderr.strip().splitlines()[-1].replace("'", '"'))


def test_a_structure_check_that_passed_is_remembered_and_a_second_run_loads_no_transformers(tiny, tmp_path):
    plan = write_plan(tmp_path, f"model: {tiny('llama')}\noutput: {tmp_path / 'out'}\n"
                                "steps:\n  - op: chain\n    layers: [0-1, 4-5]\n")
    cache = tmp_path / "cache"
    assert _run(cache, "apply", plan, "--no-fsync") == ["torch", "transformers"]
    first = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert len(list((cache / "verified").glob("*.json"))) == 1
    assert _run(cache, "apply", plan, "--no-fsync", "--force") == []
    second = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert second["structure"] == first["structure"] and "LlamaForCausalLM" in first["structure"]
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 0


def test_a_remembered_verdict_is_only_for_the_same_inputs(tiny, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    checked = []
    real = verify._verify
    monkeypatch.setattr(verify, "_verify", lambda *a: checked.append(1) or real(*a))

    def apply(layers: str, model: Path, name: str) -> None:
        plan = write_plan(tmp_path, f"model: {model}\noutput: {tmp_path / name}\nsteps:\n  - op: chain\n"
                                    f"    layers: {layers}\n", name=f"{name}.yaml")
        assert cli("apply", plan, "--no-fsync").code == 0

    apply("[0-1, 4-5]", tiny("llama"), "a")
    apply("[0-1, 4-5]", tiny("llama"), "b")
    assert len(checked) == 1
    apply("[0-1, 3-5]", tiny("llama"), "c")  # another layer map
    apply("[0-1, 4-5]", tiny("qwen2"), "d")  # another model
    assert len(checked) == 3
    for record in (tmp_path / "cache" / "verified").glob("*.json"):
        record.write_text(json.dumps({"key": "0" * 64, "value": "forged"}))
    apply("[0-1, 4-5]", tiny("llama"), "e")  # a record for another key is not trusted
    assert len(checked) == 4 and "forged" not in (tmp_path / "e" / "surgery.json").read_text()


def test_a_refusal_is_checked_every_time(tiny, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    checked = []

    def refuse(*args: object) -> None:
        checked.append(1)
        raise SurgeryError("output layer 2 would not be built as its source layer")

    monkeypatch.setattr(verify, "_verify", refuse)
    plan = write_plan(tmp_path, f"model: {tiny('llama')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n"
                                "    layers: [1, 0, 2-5]\n")
    for _ in range(2):
        result = cli("apply", plan)
        assert result.code == 2 and "would not be built as its source layer" in result.err
    assert len(checked) == 2 and not (tmp_path / "cache" / "verified").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(fused.combine is None or _may_have_cuda(), reason="needs the fused kernel and a machine "
                    "where torch surely sees no GPU")
def test_a_fused_merge_on_a_machine_without_a_gpu_never_imports_torch(tiny, tmp_path):
    model = tiny("llama")
    plan = write_plan(tmp_path, f"base: {model}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: task_arithmetic\n"
                                f"    models: [{model}, {model}]\n")
    assert _run(tmp_path / "cache", "apply", plan, "--no-fsync") == []
