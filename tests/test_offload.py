"""Scoring a model larger than the memory it may use: `eval --max-memory` keeps at most that many bytes
of weights on the device (here the CPU: the rest wait on disk and come in layer by layer), and the
score is the uncapped one."""

from __future__ import annotations

import importlib.util
import json
import shutil

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


@needs_accelerate
def test_a_plans_evaluate_section_scores_under_its_cap_and_its_gates_too(cli, tmp_path):
    base = demo_model("base")
    body = (f"model: {base}\nsteps:\n  - op: chain\n    layers: [0-5, 7]\nevaluate:\n  max_tokens: 300\n"
            "  window: 64\n  device: cpu\n  limits:\n    kl: 10\n")
    reports = {}
    for name, cap in (("free", ""), ("capped", f"  max_memory: {CAP}\n")):
        plan = write_plan(tmp_path, f"output: {tmp_path / name}\n{body}{cap}", name=f"{name}.yaml")
        result = cli("apply", plan, "--no-fsync")
        assert result.code == 0, result.err
        reports[name] = json.loads((tmp_path / name / "surgery.json").read_text())
    free, capped = (reports[k] for k in ("free", "capped"))
    assert capped["evaluation"]["perplexity"] == pytest.approx(free["evaluation"]["perplexity"], rel=1e-6)
    assert capped["quality_gates"]["measured"]["kl"] == pytest.approx(free["quality_gates"]["measured"]["kl"], abs=1e-6)


def test_a_bad_cap_in_a_plan_is_refused_before_writing(cli, tmp_path):
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n"
                                "    layers: [0-5, 7]\nevaluate:\n  max_memory: 12KB\n")
    result = cli("apply", plan)
    assert result.code == 2 and "at least 1MiB" in result.err and not (tmp_path / "out").exists()


def test_a_cap_on_a_compact_output_is_refused_by_check_before_writing(cli, tmp_path):
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: tie\n"
                                "    loops: 2\nevaluate:\n  max_memory: 2MiB\n")
    for command in ("check", "apply"):
        result = cli(command, plan)
        assert result.code == 2 and "memory cap loads standard checkpoints only" in result.err
    assert not (tmp_path / "out").exists()


def test_a_config_its_tensors_do_not_fit_is_one_line(tiny, cli, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny("qwen2"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    result = cli("eval", broken, "--no-compare")
    assert result.code == 2 and "cannot load it as a causal LM" in result.err and "Traceback" not in result.err
