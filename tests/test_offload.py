"""Scoring a model larger than the memory it may use: `eval --max-memory` keeps at most that many bytes
of weights on the device (here the CPU: the rest wait on disk and come in layer by layer), and the
score is the uncapped one."""

from __future__ import annotations

import importlib.util
import json

import pytest

from surgery.demo_models import demo_model
from surgery.evaluation.loading import load_for_eval
from tests.conftest import write_plan

needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="needs accelerate (pip install 'surgery[offload]')")
CAP = "2MiB"


def _model_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@needs_accelerate
def test_a_model_larger_than_the_cap_waits_on_disk_and_scores_as_uncapped(cli):
    base = demo_model("base")
    assert _model_bytes(base) > 4 << 20  # well over the cap
    loaded = load_for_eval(base, "cpu", "float32", max_memory=2 << 20)
    placed = list(loaded.model.hf_device_map.values())
    assert placed[:2] == ["cpu", "cpu"] and placed.count("disk") > len(placed) // 2  # the first layers fit
    args = ("eval", base, "--no-compare", "--max-tokens", "600", "--window", "128", "--device", "cpu", "--json")
    uncapped = json.loads(cli(*args).out)
    capped = cli(*args, "--max-memory", CAP)
    assert capped.code == 0, capped.err
    assert json.loads(capped.out)["perplexity"] == pytest.approx(uncapped["perplexity"], rel=1e-6)


@needs_accelerate
def test_a_compared_base_is_capped_too(cli, tmp_path):
    base = demo_model("base")
    plan = write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n    layers: [0-5, 7]\n")
    assert cli("apply", plan, "--no-fsync").code == 0
    args = ("eval", tmp_path / "out", "--max-tokens", "300", "--window", "64", "--device", "cpu", "--json")
    uncapped = json.loads(cli(*args).out)
    capped = json.loads(cli(*args, "--max-memory", CAP).out)
    assert capped["base_perplexity"] == pytest.approx(uncapped["base_perplexity"], rel=1e-6)
    assert capped["perplexity"] == pytest.approx(uncapped["perplexity"], rel=1e-6)


@pytest.mark.parametrize("size, message", [("lots", "not a size"), ("10KB", "at least 1MiB")])
def test_a_bad_cap_is_one_line(size, message, cli):
    result = cli("eval", demo_model("base"), "--no-compare", "--max-memory", size)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
