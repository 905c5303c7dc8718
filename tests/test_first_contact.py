"""The rough edges a new user hit first: errors that say where and what, flags where users put them."""

from __future__ import annotations

import json

import pytest

from surgery.evaluation.data import BUILTIN
from tests.conftest import write_plan


@pytest.fixture
def llama(tiny):
    return tiny("llama")


def _error(result) -> str:
    assert result.code == 2, result
    lines = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    return lines[0]


def test_a_misspelled_field_is_named_with_the_one_meant(cli, llama, tmp_path):
    plan = write_plan(tmp_path, f"model: {llama}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n    layer: [0, 1]\n")
    assert _error(cli("check", plan)).endswith("plan.yaml:5: steps[0].layer: unknown field; did you mean 'layers'?")


def test_no_raw_validation_text(cli, llama, tmp_path):
    plan = write_plan(tmp_path, f"model: {llama}\noutput: {tmp_path / 'out'}\nsteps: []\n")
    assert _error(cli("check", plan)).endswith("plan.yaml:3: steps: is empty; give at least one")


@pytest.mark.parametrize("body, line, message", [
    ("model: {missing}\nsteps:\n  - op: chain\n    layers: [0]\n", 1, "does not exist"),
    ("model: {llama}\nsteps:\n  - op: chain\n    layers: [0, 99]\n", 3, "layer 99 is out of range"),
    ("model: {llama}\nsteps:\n  - op: chain\n    layers: [0]\n  - op: chain\n    layers: [{{layers: [0], scale: {{zzz: 2}}}}]\n",
     5, "scale key 'zzz' matches no tensor"),
])
def test_every_plan_error_names_its_file_and_line(body, line, message, cli, llama, tmp_path):
    plan = write_plan(tmp_path, f"output: {tmp_path / 'out'}\n" + body.format(llama=llama, missing=tmp_path / "nope"))
    error = _error(cli("check", plan))
    assert f"plan.yaml:{line + 1}: " in error and message in error


def test_debug_works_after_the_command_too(cli, tmp_path):
    plan = write_plan(tmp_path, "steps: []\n")
    for args in (("--debug", "check", plan), ("check", plan, "--debug")):
        with pytest.raises(Exception, match="is empty"):  # the traceback's exception, not one line
            cli(*args)


def test_check_says_when_apply_would_refuse_the_output(cli, llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = cli("check", write_plan(tmp_path, f"model: {llama}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0]\n"))
    assert result.code == 0 and "already exists" in result.out and "--force" in result.out


def test_an_evaluation_window_beyond_the_context_is_refused(cli, llama, tmp_path):
    assert "longer than" in _error(cli("eval", llama, "--window", "100000", "--max-tokens", "64"))
    plan = write_plan(tmp_path, f"model: {llama}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n    layers: [0]\n"
                      "evaluate: {window: 100000}\n")
    assert "evaluate.window" in _error(cli("check", plan)) and not (tmp_path / "out").exists()


def test_eval_help_lists_every_built_in_text(cli):
    result = cli("eval", "--help")
    text = " ".join(result.out.split())
    assert all(name in text.replace("- ", "-") for name in BUILTIN), result.out


def test_inspect_reads_an_ensemble_folder(cli, tiny, tmp_path):
    import json
    import shutil

    members = [tmp_path / "a", tmp_path / "b"]
    for member in members:
        shutil.copytree(tiny("llama"), member)
    out = tmp_path / "ens"
    plan = write_plan(tmp_path, f"output: {out}\nsteps:\n  - op: ensemble\n    members: [{members[0]}, {members[1]}]\n")
    assert cli("apply", plan).code == 0
    result = cli("inspect", out, "--json")
    assert result.code == 0, result.err
    ensemble = json.loads(result.out)["ensemble"]
    assert [m["path"] for m in ensemble["members"]] == [str(m) for m in members]
    assert all(m["layers"] == 6 and m["weight"] == 0.5 for m in ensemble["members"])
    text = cli("inspect", out)
    assert text.code == 0 and "ensemble of 2 models" in text.out

    # diff reads them too: settings and members, a member's weights compared by their recorded hashes
    other = tmp_path / "ens2"
    shutil.copytree(tiny("qwen3"), tmp_path / "c")
    plan = write_plan(tmp_path, f"output: {other}\nsteps:\n  - op: ensemble\n    members: [{members[0]}, {tmp_path / 'c'}]\n"
                      "    weights: [0.25, 0.75]\n", "other.yaml")
    assert cli("apply", plan).code == 0
    same = json.loads(cli("diff", out, out, "--json").out)
    assert not same["differs"] and "member 0: the same files (sha256) in both" in same["notes"]
    changed = json.loads(cli("diff", out, other, "--json").out)
    assert changed["differs"] and changed["config"]["changed"]["weights"] == [[0.5, 0.5], [0.25, 0.75]]
    assert changed["config"]["changed"]["members.1"] == [str(members[1]), str(tmp_path / "c")]
    assert any(f"surgery diff {members[1]} {tmp_path / 'c'}" in note for note in changed["notes"])
    assert "like with like" in _error(cli("diff", members[0], out))
    # and the demo on an ensemble says it edits one model's layers, writing nothing
    assert "is an ensemble" in _error(cli("demo", "--model", out, "--out-dir", tmp_path / "demo"))
    assert not (tmp_path / "demo").exists()


def test_ctrl_c_while_scoring_keeps_the_output_and_says_how_to_finish(cli, llama, tmp_path, monkeypatch):
    import surgery.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(surgery.pipeline, "_evaluate", interrupted)
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {llama}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0]\n"
                      "evaluate: {data: builtin:mixed-heldout, max_tokens: 64}\n")
    result = cli("apply", plan)
    assert result.code == 130 and "is complete and kept" in result.err and "--resume" in result.err
    assert (out / "model.safetensors").is_file()


def test_the_first_tokens_of_a_long_text_are_those_of_the_whole_text(llama):
    """Scores and fits read the first N tokens; tokenizing a prefix instead of megabytes gives the same ids."""
    from transformers import AutoTokenizer

    from surgery.evaluation.data import first_tokens

    tokenizer = AutoTokenizer.from_pretrained(llama)
    for name, text in BUILTIN.items():
        whole = tokenizer(text())["input_ids"]
        for count in (1, 2, 100, 4096, len(whole) - 1, len(whole) + 5):
            assert first_tokens(tokenizer, text(), count) == whole[:count], (name, count)


def test_the_card_shows_the_plan_as_written(cli, llama, tmp_path):
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"# keep the first two layers\nmodel: {llama}\noutput: {out}\nsteps:\n  - op: chain\n"
                      "    layers: [0-1]   # the rest go\n")
    assert cli("apply", plan).code == 0
    card = (out / "README.md").read_text()
    assert "# keep the first two layers" in card and "layers: [0-1]   # the rest go" in card
    record = json.loads((out / "surgery.json").read_text())
    assert record["plan"]["steps"][0]["layers"] == [{"layers": [0, 1]}]  # and the record has it resolved
    # a comment is not the edit: the same plan with other comments resumes as the same run
    again = write_plan(tmp_path, plan.read_text().replace("the rest go", "gone"), "again.yaml")
    assert cli("apply", again, "--resume").code == 0


def test_check_then_apply_runs_a_fit_once(cli, llama, tmp_path, monkeypatch):
    """bits' calibration (like aTLAS's training) is remembered for the same inputs; a damaged memo is refitted."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {llama}\noutput: {out}\nsteps:\n  - op: bits\n    score: lim\n"
                      "    calibration: {data: builtin:mixed-dev, samples: 2, seq_len: 64}\n"
                      "    assign: {high: 8, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 32}\n")
    checked = cli("check", plan)
    assert checked.code == 0 and "bits: scoring" in checked.err
    applied = cli("apply", plan)
    assert applied.code == 0 and "bits: scoring" not in applied.err and "reusing it" in applied.err
    first = (out / "model.safetensors").read_bytes()
    [memo] = (tmp_path / "cache" / "fits").iterdir()
    memo.write_text('{"key": "%s", "value": [1, 2]}' % json.loads(memo.read_text())["key"])  # wrong length
    again = cli("apply", plan, "--force")
    assert again.code == 0 and "bits: scoring" in again.err
    assert (out / "model.safetensors").read_bytes() == first


def test_demo_on_the_users_own_model(cli, llama, tmp_path):
    """`surgery demo --model` runs the single-model example plans, their layer lists fitted to its depth."""
    import yaml

    from surgery.demo_models.models import TINY_LAYERS
    from surgery.demo_models.plans import DEPTH_RULES, example_plans

    for plan in example_plans():  # on the demo base's 8 layers the rules are the examples' own lists
        if plan.stem in DEPTH_RULES:
            assert DEPTH_RULES[plan.stem](8) == yaml.safe_load(plan.read_text())["steps"][0]["layers"]
    result = cli("demo", "--model", llama, "--out-dir", tmp_path, "--json")
    assert result.code == 0, result.err
    rows = {row["plan"]: row for row in json.loads(result.out)["plans"]}
    assert set(rows) == {plan.stem for plan in example_plans()}
    assert "several models" in rows["ties"]["skipped"] and "skipped" not in rows["bits"]
    assert rows["drop-late-layers"]["layers"] == f"{TINY_LAYERS} -> {TINY_LAYERS - 2}"
    assert (tmp_path / "reorder" / "model.safetensors").is_file()
    written = yaml.safe_load((tmp_path / "plans" / "reorder.yaml").read_text())
    assert written["model"] == str(llama) and written["steps"][0]["layers"] == DEPTH_RULES["reorder"](TINY_LAYERS)
    assert [s["data"] for s in rows["reorder"]["scores"]] == ["builtin:prose-heldout", "builtin:code-heldout"]


def test_the_demo_table_fits_80_columns(monkeypatch):
    from rich.console import Console

    import surgery.cli.demo as demo

    narrow = Console(width=80, record=True)
    monkeypatch.setattr(demo, "console", narrow)
    scores = [{"data": "builtin:mixed-heldout", "perplexity": 1250.0, "reference": 1000.0}]
    demo._print_rows([{"plan": "task-arithmetic", "about": "x", "layer_map": "demo:base[0-7] " * 12,
                       "layers": "12 -> 12", "bytes": 999 * 1024, "seconds": 12.3, "scores": scores},
                      {"plan": "drop-late-layers", "skipped": "why"}])
    text = narrow.export_text()
    assert max(map(len, text.splitlines())) <= 80
    assert "task-arithmetic" in text and "drop-late-layers" in text and "+25.0%" in text and "…" not in text
    assert text.count("demo:base[0-7]") == 12  # the layer map in full, wrapped


def test_every_long_phase_says_what_it_is_doing(llama, tmp_path):
    """Checking the plan and scoring each model are announced while they run (the CLI shows them as a
    spinner on a terminal only, so that in a pipe a failure stays one line)."""
    from contextlib import contextmanager

    from surgery.evaluation.run import EvalSettings, evaluate
    from surgery.pipeline import Hooks, apply

    phases = []

    @contextmanager
    def phase(text):
        phases.append(text)
        yield

    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {llama}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 0-5]\n"
                      "evaluate: {data: builtin:mixed-heldout, max_tokens: 64}\n")
    apply(plan, hooks=Hooks(phase=phase))
    assert phases[0] == "checking the plan against the checkpoints"
    assert phases[1].startswith(f"scoring {out} on 64 tokens of builtin:mixed-heldout")
    assert phases[2] == f"scoring the reference {llama} on the same tokens"
    evaluate(out, EvalSettings(data=("builtin:mixed-heldout",), max_tokens=64), phase=phase)
    assert len(phases) == 4


def test_demo_on_an_encoder_edits_without_scoring(cli, tiny, tmp_path):
    """A model without a language-model head gets the edits, not the perplexity it cannot have."""
    import yaml

    result = cli("demo", "--model", tiny("bert"), "--out-dir", tmp_path, "--json")
    assert result.code == 0, result.err
    rows = {row["plan"]: row for row in json.loads(result.out)["plans"]}
    assert "skipped" not in rows["reorder"] and rows["reorder"]["scores"] == []
    assert "evaluate" not in yaml.safe_load((tmp_path / "plans" / "reorder.yaml").read_text())
    assert "no language-model head" in result.err and (tmp_path / "reorder" / "model.safetensors").is_file()
