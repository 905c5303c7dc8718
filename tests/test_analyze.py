"""`surgery analyze`: metrics against transformers' own hidden states, and the plans it suggests."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from surgery.demo_models import demo_model
from tests.reference import load

ARGS = ("--data", "builtin:mixed-dev", "--samples", "4", "--seq-len", "128", "--device", "cpu")


def test_metrics_equal_direct_computations(cli, tmp_path):
    base = demo_model("base")
    result = cli("analyze", base, *ARGS, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert len(data["layers"]) == 8 and data["tokens"] == 512
    from transformers import AutoTokenizer

    from surgery.evaluation.data import load_text

    ids = AutoTokenizer.from_pretrained(base)(load_text("builtin:mixed-dev").text)["input_ids"][:6 * 128]
    model = load(base)
    cos = torch.zeros(7, dtype=torch.float64)
    step = torch.zeros(7, dtype=torch.float64)
    angle = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for row in torch.tensor(ids).reshape(6, 128)[:4]:  # the first 4 rows are measured, the rest held out
            h = [x[0].double() for x in model(input_ids=row[None], output_hidden_states=True).hidden_states]
            for i in range(7):  # hidden_states[8] has the final norm applied: layers 0-6 are checked
                cos[i] += torch.nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1).sum()
                step[i] += ((h[i + 1] - h[i]).norm(dim=-1) / h[i].norm(dim=-1)).sum()
            for i in range(6):
                angle[i] += (torch.nn.functional.cosine_similarity(h[i], h[i + 2], dim=-1).clamp(-1, 1).acos() / math.pi).sum()
    layers = data["layers"]
    assert [m["bi"] for m in layers[:7]] == pytest.approx((1 - cos / 512).tolist(), abs=1e-5)
    assert [m["lim"] for m in layers[:7]] == pytest.approx((-cos / 512).tolist(), abs=1e-5)
    assert [m["layer"] for m in layers[:7]] == pytest.approx((step / 512).tolist(), rel=1e-4)
    assert data["distances"]["2"][:6] == pytest.approx((angle / 512).tolist(), abs=1e-5)
    assert all(m["attn"] > 0 and m["mlp"] > 0 and 0 < m["zd"] < 1 for m in layers)
    best = data["best_blocks"]["2"]
    assert best["distance"] == min(data["distances"]["2"])


def test_plot(cli, tmp_path):
    pytest.importorskip("matplotlib")
    result = cli("analyze", demo_model("base"), *ARGS, "--plot", tmp_path / "profile.png")
    assert result.code == 0, result.err
    assert (tmp_path / "profile.png").stat().st_size > 0


def test_suggested_drop_is_chosen_by_measured_perplexity(cli, tmp_path):
    plan = tmp_path / "drop.yaml"
    result = cli("analyze", demo_model("base"), *ARGS, "--json", "--suggest", "drop=2", "--candidates", "8",
                 "--write-plan", plan)
    assert result.code == 0, result.err
    trials = json.loads(result.out)["suggestion"]["trials"]
    first = trials[1]
    assert first["perplexity"] == min(first["candidates"].values())  # every layer was a candidate
    written = yaml.safe_load(plan.read_text())
    kept = written["steps"][0]["layers"]
    assert len(trials[2]["dropped"]) == 2 and len(kept) >= 1
    assert written["output"] == "./base-drop2"  # beside the plan, never inside the model's cache folder
    result = cli("check", plan, "--json")
    assert result.code == 0 and json.loads(result.out)["output"] == str(tmp_path / "base-drop2")


@pytest.mark.parametrize("spec, op", [("bits=5", "bits"), ("tie=2", "tie")])
def test_other_suggestions_are_valid_plans(spec, op, cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    result = cli("analyze", demo_model("base"), *ARGS, "--suggest", spec, "--write-plan", plan)
    assert result.code == 0, result.err
    written = yaml.safe_load(plan.read_text())
    assert written["steps"][0]["op"] == op
    assert cli("check", plan, "--out", tmp_path / "out").code == 0
    if op == "tie":
        assert written["steps"][0]["init"] in ("average", "stepwise", "lower")


@pytest.mark.parametrize("args, message", [
    (("--suggest", "shrink=2"), "write drop=N, bits=AVG or tie=B"),
    (("--suggest", "drop=8"), "drop between 1 and 7"),
    (("--seq-len", "100000"), "rows of 100000 tokens"),
])
def test_bad_analyze_input(args, message, cli):
    result = cli("analyze", demo_model("base"), "--data", "builtin:mixed-dev", "--samples", "4", "--device", "cpu", *args)
    assert result.code == 2 and message in result.err, result.err


def test_chain_moves_skip_or_repeat_one_block():
    from surgery.analysis.chain_search import _moves

    moves = _moves([0, 1, 2])
    assert [1, 2] in moves and [0, 2] in moves and [0] in moves and [0, 0, 1, 2] in moves
    assert [0, 1, 0, 1, 2] in moves and [0, 1, 2, 0, 1, 2] in moves
    assert [] not in moves  # never skip everything
    # blocks of 1-3 positions here: 3 + 2 + 1 skips (less the one that empties the chain) and as many repeats
    assert len(moves) == 5 + 6 and len({tuple(m) for m in moves}) == len(moves)


def test_chain_search_only_accepts_improvements(cli, tmp_path):
    plan = tmp_path / "chain.yaml"
    result = cli("analyze", demo_model("base"), "--data", "builtin:mixed-dev", "--samples", "4", "--seq-len", "64",
                 "--device", "cpu", "--search-chain", "--budget", "20", "--json", "--write-plan", plan)
    assert result.code == 0, result.err
    trials = json.loads(result.out)["suggestion"]["trials"]
    assert trials[0]["chain"] == list(range(8))
    costs = [t["cost"] for t in trials]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)  # each step strictly better
    assert cli("check", plan, "--out", tmp_path / "out").code == 0
    assert cli("analyze", demo_model("base"), "--suggest", "drop=1", "--search-chain").code == 2
