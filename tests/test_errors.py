"""Bad input: one clear line naming what is wrong, exit code 2, no traceback, nothing written.

Files that are broken as files (corrupt shards, indexes, configs, unparseable or hostile YAML) are
the corpus of test_malformed.py; here are well-formed plans and arguments that are wrong.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import listing, write_plan
from tests.reference import load


def _plan(model: object, layers: str = "[0-2]", out: str = "out", extra: str = "") -> str:
    return f"model: {model}\noutput: {out}\n{extra}steps:\n  - op: chain\n    layers: {layers}\n"


def _assert_clean_failure(result, tmp_path: Path, before: list[str], *needles: str) -> None:
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert listing(tmp_path) == before, "something was written"


def _copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


CASES = {
    "missing model": (lambda t, m: _plan(t / "nope"), ["does not exist", "nope"]),
    "layer out of range": (lambda t, m: _plan(m, "[0-6]"), ["layer 6 is out of range", "6 layers (0-5)"]),
    "reversed range": (lambda t, m: _plan(m, "[5-2]"), ["plan.yaml:5", "reversed", "'2-5'"]),
    "empty layer list": (lambda t, m: _plan(m, "[]"), ["plan.yaml:5", "no layers given"]),
    "not a layer": (lambda t, m: _plan(m, "[0, abc]"), ["plan.yaml:5", "'abc' is not a layer"]),
    "negative layer": (lambda t, m: _plan(m, "[-1]"), ["negative"]),
    "unknown op": (lambda t, m: f"model: {m}\noutput: out\nsteps:\n  - op: chian\n    layers: [0]\n",
                   ["plan.yaml:3", "unknown op 'chian'", "known ops: chain"]),
    "unknown step field": (lambda t, m: _plan(m, "[0]\n    scales: {o_proj: 2}"),
                           ["plan.yaml:6", "steps[0].scales", "unknown field"]),
    "unknown top-level field": (lambda t, m: "modle: x\n" + _plan(m), ["plan.yaml:1", "modle", "unknown field"]),
    "no steps": (lambda t, m: f"model: {m}\noutput: out\n", ["steps", "required field is missing"]),
    "no output": (lambda t, m: f"model: {m}\nsteps:\n  - op: chain\n    layers: [0]\n", ["no output folder", "--out"]),
    "scale matches nothing": (lambda t, m: _plan(m, "\n      - {layers: 0-1, scale: {o_prj: 0.5}}"),
                              ["scale key 'o_prj' matches no tensor", "o_proj"]),
    "frankenmerge of two architectures": (
        lambda t, m: _plan(m, f"\n      - {{layers: 0-1}}\n      - {{model: {m.parent / 'tiny-mistral'}, layers: 2}}"),
        ["'mistral' model", "'llama'", "one architecture"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_plan(case, tiny, cli, tmp_path):
    tiny("mistral")
    make, needles = CASES[case]
    write_plan(tmp_path, make(tmp_path, tiny("llama")))
    before = listing(tmp_path)
    _assert_clean_failure(cli("apply", tmp_path / "plan.yaml"), tmp_path, before, *needles)
    _assert_clean_failure(cli("check", tmp_path / "plan.yaml"), tmp_path, before, *needles)


def test_missing_plan_file(cli, tmp_path):
    _assert_clean_failure(cli("apply", tmp_path / "absent.yaml"), tmp_path, [], "absent.yaml", "does not exist")


def test_frankenmerge_of_different_sizes(tiny, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    a = tiny("llama")
    config = load(a).config
    config.hidden_size, config.intermediate_size = 48, 96
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    write_plan(tmp_path, _plan(a, f"\n      - {{layers: 0-1}}\n      - {{model: {tmp_path / 'wide'}, layers: 2}}"))
    before = listing(tmp_path)
    _assert_clean_failure(cli("apply", tmp_path / "plan.yaml"), tmp_path, before, "shape", "one size")


def test_unknown_layout(tiny, cli, tmp_path):
    model = _copy_model(tiny("mistral"), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 8
    (model / "config.json").write_text(json.dumps(config))
    write_plan(tmp_path, _plan(model))
    before = listing(tmp_path)
    _assert_clean_failure(cli("apply", tmp_path / "plan.yaml"), tmp_path, before,
                          "cannot place the layer tensors", "model.layers.{0..5}")


def test_existing_output_needs_force(tiny, cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    write_plan(tmp_path, _plan(tiny("llama")))
    before = listing(tmp_path)
    _assert_clean_failure(cli("apply", tmp_path / "plan.yaml"), tmp_path, before, "already exists", "--force")
    assert cli("apply", tmp_path / "plan.yaml", "--force").code == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_output_inside_the_input_is_refused(tiny, cli, tmp_path):
    model = _copy_model(tiny("llama"), tmp_path / "model")
    write_plan(tmp_path, _plan(model, out=str(model / "edited")))
    before = listing(tmp_path)
    _assert_clean_failure(cli("apply", tmp_path / "plan.yaml", "--force"), tmp_path, before, "inputs are never modified")


def test_unknown_model_folder_for_inspect(cli, tmp_path):
    _assert_clean_failure(cli("inspect", tmp_path / "nothing"), tmp_path, [], "does not exist")


def test_inputs_are_never_modified(tiny, cli, tmp_path):
    model = _copy_model(tiny("llama"), tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    write_plan(tmp_path, _plan(model, "\n      - {layers: 0-5, scale: {o_proj: 0.5}}"))
    assert cli("apply", tmp_path / "plan.yaml").code == 0
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_failure_mid_write_leaves_nothing(tiny, cli, tmp_path, monkeypatch):
    import surgery.output.execute

    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    original = surgery.output.execute.write_shard
    monkeypatch.setattr(surgery.output.execute, "write_shard", failing_write)
    write_plan(tmp_path, _plan(tiny("llama")))
    before = listing(tmp_path)
    result = cli("apply", tmp_path / "plan.yaml", "--shard-size", "100KB")
    assert result.code == 1 and "no space left on the device" in result.err and "partial output was removed" in result.err
    assert listing(tmp_path) == before


def test_debug_shows_the_traceback(tiny, tmp_path):
    write_plan(tmp_path, _plan(tiny("llama"), "[0-9]"))
    quiet = subprocess.run([sys.executable, "-m", "surgery", "apply", tmp_path / "plan.yaml"], capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "out of range" in quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "surgery", "--debug", "apply", tmp_path / "plan.yaml"],
                          capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no CUDA")
def test_cuda_requested_where_there_is_none(tiny, cli, tmp_path):
    write_plan(tmp_path, _plan(tiny("llama"), "\n      - {layers: 0-1, scale: {o_proj: 0.5}}"))
    before = listing(tmp_path)
    _assert_clean_failure(cli("apply", tmp_path / "plan.yaml", "--device", "cuda"), tmp_path, before,
                          "no CUDA device", "--device cpu")


def test_unknown_device(tiny, cli, tmp_path):
    write_plan(tmp_path, _plan(tiny("llama")))
    before = listing(tmp_path)
    _assert_clean_failure(cli("apply", tmp_path / "plan.yaml", "--device", "tpu"), tmp_path, before,
                          "unknown device 'tpu'")
