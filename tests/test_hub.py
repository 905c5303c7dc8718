"""Pushing to the Hub: the real huggingface_hub client over real HTTP against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import os

import pytest
from huggingface_hub import ModelCard

from surgery.demo_models import demo_model
from tests.conftest import write_plan
from tests.hub_server import TOKEN, FakeHub


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield fake


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A real apply output with an evaluation (weights, config, tokenizer, surgery.json, card)."""
    from surgery.pipeline import apply

    folder = tmp_path_factory.mktemp("apply")
    plan = write_plan(folder, f"model: {demo_model('base')}\noutput: {folder / 'out'}\nsteps:\n  - op: chain\n"
                      "    layers: [0-5, 7]\nevaluate: {data: builtin:mixed-heldout, max_tokens: 256}\n")
    return apply(plan, fsync=False).output


def _all_output(result) -> str:
    return result.out + result.err


def test_push_uploads_every_file_byte_identical(hub, output, cli):
    result = cli("push", output, "alice/drop-one", "--private", "--revision", "experiment")
    assert result.code == 0, result.err
    assert "alice/drop-one" in result.out and "/commit/" in result.out
    repo = hub.state.repos["alice/drop-one"]
    assert repo["private"] is True
    files = repo["branches"]["experiment"]
    expected = {str(p.relative_to(output)): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert files.keys() == expected.keys()
    assert all(files[name] == expected[name] for name in expected if name != "README.md")  # byte-identical
    # the card goes up as the Hub shows it: loading names the repo, not the folder this machine wrote
    card_text = files["README.md"].decode()
    assert "from_pretrained('alice/drop-one')" in card_text and str(output) not in card_text.split("## How to load")[1]
    assert "model.safetensors" in files and any(r["path"].startswith("/lfs-upload/") for r in hub.state.requests)
    assert any("/branch/experiment" in r["path"] for r in hub.state.requests)
    assert any(r["path"].endswith("/api/validate-yaml") for r in hub.state.requests)
    card = ModelCard(files["README.md"].decode())
    assert "surgery" in card.data.tags and "chain" in card.data.tags
    assert card.data.library_name == "transformers" and card.data.get("base_model") is None  # a local source: no id
    assert "## Evaluation" in card.text and "builtin:mixed-heldout" in card.text
    # the token went only into Authorization headers, and nowhere else
    assert TOKEN not in _all_output(result)
    for path in output.rglob("*"):
        assert TOKEN.encode() not in path.read_bytes()
    assert all(TOKEN.encode() not in r["body"] for r in hub.state.requests)


def test_apply_with_push_and_the_plan_section(hub, cli, tmp_path):
    body = f"model: {demo_model('base')}\nsteps:\n  - op: chain\n    layers: [0-3]\n"
    result = cli("apply", write_plan(tmp_path, f"output: {tmp_path / 'a'}\n{body}", "a.yaml"), "--push", "bob/four")
    assert result.code == 0, result.err
    assert "README.md" in hub.state.repos["bob/four"]["branches"]["main"]
    plan = write_plan(tmp_path, f"output: {tmp_path / 'b'}\n{body}push: {{repo: bob/four-private, private: true, "
                      "revision: v1}\n", "b.yaml")
    assert cli("apply", plan).code == 0
    assert hub.state.repos["bob/four-private"]["private"] is True
    assert "model.safetensors" in hub.state.repos["bob/four-private"]["branches"]["v1"]


def test_large_folders_take_the_resumable_path(hub, output, cli, tmp_path, monkeypatch):
    """huggingface_hub 1.x: upload_large_folder; 2.x: upload_folder, resumable itself."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    monkeypatch.setattr("surgery.hub.LARGE_FOLDER_BYTES", 0)
    result = cli("push", copy, "alice/large", "--revision", "big")
    assert result.code == 0, result.err
    expected = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*")
                if p.is_file() and ".cache" not in p.parts}
    uploaded = hub.state.repos["alice/large"]["branches"]["big"]
    assert uploaded.keys() == expected.keys() and "from_pretrained('alice/large')" in uploaded["README.md"].decode()
    assert all(uploaded[name] == expected[name] for name in expected if name != "README.md")


def test_dry_run_sends_nothing(hub, output, cli):
    result = cli("push", output, "alice/dry", "--dry-run")
    assert result.code == 0, result.err
    assert "model.safetensors" in result.out and "README.md" in result.out and "nothing sent" in result.out
    assert "library_name: transformers" in result.out  # the card is shown
    assert hub.state.requests == []


@pytest.mark.parametrize("route, status, message", [
    ("create", 401, "HTTP 401 (is the token valid?"),
    ("create", 403, "HTTP 403 (does the token have write access there?)"),
    ("commit", 500, "HTTP 500"),
    ("batch", 403, "HTTP 403"),  # 5xx answers are retried with backoff: the commit case covers them
    ("upload", 413, "HTTP 413"),  # the LFS PUT of a shard (a 5xx there is retried, then wrapped the same way)
])
def test_server_failures_are_one_line(route, status, message, hub, output, cli):
    hub.state.fail[route] = status
    result = cli("push", output, "alice/fails")
    errors = [line for line in result.err.splitlines() if "error" in line]  # the upload's progress bar aside
    assert result.code != 0 and len(errors) == 1 and message in errors[0], result.err
    assert TOKEN not in _all_output(result)
    assert "alice/fails" not in hub.state.repos or not hub.state.repos["alice/fails"]["branches"]["main"]


def test_bad_pushes(hub, output, cli, tmp_path, monkeypatch):
    assert "invalid repo id" in cli("push", output, "not a repo!").err
    assert "write it as OWNER/NAME" in cli("push", output, "justaname").err
    assert "is not a surgery output" in cli("push", demo_model("base"), "alice/x").err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "surgery.json").write_text("{}")
    (empty / "config.json").write_text("{}")
    assert "holds no weights" in cli("push", empty, "alice/x").err
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    result = cli("push", output, "alice/x")
    assert result.code != 0 and "cannot reach http://127.0.0.1:9" in result.err
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    result = cli("push", output, "alice/x")
    assert result.code == 2 and "hf auth login" in result.err
    assert hub.state.requests == []


@pytest.mark.skipif(not os.environ.get("SURGERY_TEST_HUB_REPO"), reason="set SURGERY_TEST_HUB_REPO (and HF_TOKEN, "
                    "optionally HF_ENDPOINT) to push to a real Hub")
def test_push_to_a_real_hub(output, cli):
    result = cli("push", output, os.environ["SURGERY_TEST_HUB_REPO"], "--private")
    assert result.code == 0, result.err
