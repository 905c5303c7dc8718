"""Quality gates (`evaluate: limits:`): a run that misses them keeps its output, says so in one line, exits 3,
records it in surgery.json and the card, and does not push; the measures equal direct computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from surgery.demo_models import demo_model
from tests.conftest import listing, write_plan

EVALUATE = "evaluate:\n  data: builtin:mixed-heldout\n  max_tokens: 1024\n  limits: {limits}\n"


def _plan(folder: Path, layers: str, limits: str, extra: str = "") -> Path:
    return write_plan(folder, f"model: {demo_model('base')}\noutput: {folder / 'out'}\nsteps:\n  - op: chain\n"
                      f"    layers: {layers}\n" + EVALUATE.format(limits=limits) + extra)


def test_missed_gates_keep_the_output_record_them_and_exit_3(cli, tmp_path):
    result = cli("apply", _plan(tmp_path, "[0, 1, 2, 3, 7]", "{perplexity_increase: 0.01, top1_agreement: 0.99, kl: 10}"))
    assert result.code == 3
    line = result.err.strip().splitlines()[-1]
    assert line.startswith("error: quality gates missed: perplexity +") and "top-1 agreement" in line
    assert "KL" not in line and "is kept, records it" in line and "not pushed" in line
    out = tmp_path / "out"
    assert cli("verify", out).code == 0
    gates = json.loads((out / "surgery.json").read_text())["quality_gates"]
    assert gates["passed"] is False and len(gates["missed"]) == 2 and set(gates["measured"]) == {
        "perplexity_increase", "top1_agreement", "kl"}
    card = (out / "README.md").read_text()
    assert "**This model misses its plan's quality gates: perplexity +" in card and "| top-1 agreement | at least 0.99 |" in card


def test_an_unchanged_model_passes_with_nothing_lost(cli, tmp_path):
    result = cli("apply", _plan(tmp_path, "[0-7]", "{perplexity_increase: 0, kl: 0, top1_agreement: 1}"))
    assert result.code == 0, result.err
    assert "quality gates passed" in result.err
    gates = json.loads((tmp_path / "out" / "surgery.json").read_text())["quality_gates"]
    assert gates["passed"] is True and gates["missed"] == []
    assert gates["measured"] == {"perplexity_increase": 0.0, "kl": 0.0, "top1_agreement": 1.0}
    assert "misses" not in (tmp_path / "out" / "README.md").read_text()


def test_the_gate_measures_equal_direct_computations(cli, tmp_path):
    """KL(reference || output) and top-1 agreement recomputed here with transformers and torch's own kl_div on
    the first 1024 tokens in rows of 512 (the window); the perplexity increase from the recorded scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.evaluation.data import load_text

    assert cli("apply", _plan(tmp_path, "[0, 1, 2, 2, 5, 6, 7]", "{perplexity_increase: 10, kl: 10, top1_agreement: 0}")
               ).code == 0
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    base, out = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (demo_model("base"), tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(demo_model("base"))
    ids = torch.tensor(tokenizer(load_text("builtin:mixed-heldout").text[:20000])["input_ids"][:1024]).reshape(2, 512)
    with torch.no_grad():
        p = base(ids).logits.double().log_softmax(-1)
        q = out(ids).logits.double().log_softmax(-1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item() / ids.numel()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    measured = record["quality_gates"]["measured"]
    assert math.isclose(measured["kl"], kl, rel_tol=1e-6) and measured["top1_agreement"] == top1
    evaluation = record["evaluation"]
    assert measured["perplexity_increase"] == evaluation["perplexity"] / evaluation["base_perplexity"] - 1


def test_missed_gates_are_not_pushed(cli, tmp_path, monkeypatch):
    import surgery.hub

    pushed = []
    monkeypatch.setattr(surgery.hub, "ready_to_push", lambda repo: "token")
    monkeypatch.setattr(surgery.hub, "push", lambda *args, **kwargs: pushed.append(args))
    result = cli("apply", _plan(tmp_path, "[0, 7]", "{kl: 0.001}", "push: {repo: someone/model}\n"))
    assert result.code == 3 and "not pushed" in result.err and pushed == []


@pytest.mark.parametrize("limits, message", [
    ("{top1_agreement: 1.5}", "top1_agreement"), ("{kl: -1}", "kl"), ("{ppl: 0.1}", "ppl: unknown field"),
    ("{perplexity_increase: much}", "perplexity_increase"),
])
def test_bad_limits_are_refused_before_anything_is_written(cli, tmp_path, limits, message):
    before = listing(tmp_path)
    plan = _plan(tmp_path, "[0-7]", limits)
    result = cli("apply", plan)
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert listing(tmp_path) == sorted(before + [plan.name])


def test_a_near_miss_never_reads_as_equal():
    from surgery.evaluation.gates import _distinct

    assert _distinct(8.904015914, 8.904) == ("8.90402", "8.904")
    assert _distinct(0.0658533, 0.1) == ("0.06585", "0.1")


def test_gates_on_a_short_text_of_the_plans_folder_measure_what_there_is(cli, tmp_path):
    """A text shorter than the window is one shorter row (not an error after writing); a data file is found
    beside the plan, as every path of a plan is."""
    plan_folder = tmp_path / "plans"
    plan_folder.mkdir()
    (plan_folder / "short.txt").write_text("def add(a, b):\n    return a + b\n")
    plan = write_plan(plan_folder, f"model: {demo_model('base')}\noutput: out\nsteps:\n  - op: chain\n    layers: [0-7]\n"
                      "evaluate:\n  data: short.txt\n  max_tokens: 64\n  limits: {kl: 0, top1_agreement: 1}\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    assert json.loads((plan_folder / "out" / "surgery.json").read_text())["quality_gates"]["passed"] is True


def test_an_output_that_missed_its_gates_is_pushed_only_when_asked(cli, tmp_path):
    assert cli("apply", _plan(tmp_path, "[0, 7]", "{kl: 0.001}")).code == 3
    result = cli("push", tmp_path / "out", "someone/model", "--dry-run")
    assert result.code == 2 and "missed its plan's quality gates (KL" in result.err and "--allow-failed-gates" in result.err
    assert cli("push", tmp_path / "out", "someone/model", "--dry-run", "--allow-failed-gates").code == 0


def test_a_reference_with_a_shorter_context_bounds_the_window(cli, tiny):
    """Both models are scored on the same windows: the shorter context (tiny-gpt2's 128 positions) bounds them,
    where the output's alone once gave an IndexError."""
    result = cli("eval", demo_model("base"), "--compare", tiny("gpt2"), "--max-tokens", "512", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["window"] == 128
