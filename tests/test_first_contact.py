"""The rough edges a new user hit first: errors that say where and what, flags where users put them."""

from __future__ import annotations

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
