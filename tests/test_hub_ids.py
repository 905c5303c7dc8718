"""Hub ids wherever a model is named: `org/name` and `org/name@revision` in plans and on the command
line resolve through huggingface_hub's cache (tests run offline: HF_HUB_OFFLINE=1, see conftest), and
the output records the id and the commit; its card's base_model is a Hub id, never a local path."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard, constants

from tests.conftest import write_plan

COMMIT = "3f2a" * 10


@pytest.fixture
def hub_cache(tiny, tmp_path, monkeypatch):
    """A Hugging Face cache holding `org/tiny` at COMMIT (the ref `main` points there), as `hf download`
    leaves it: files in blobs/, links to them in snapshots/COMMIT/."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for item in tiny("llama").iterdir():
        shutil.copy(item, repo / "blobs" / item.name)
        (snapshot / item.name).symlink_to(f"../../blobs/{item.name}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return snapshot


@pytest.mark.parametrize("ref", ["org/tiny", f"org/tiny@{COMMIT}", "org/tiny@main"])
def test_a_plan_names_a_model_by_its_hub_id(ref, hub_cache, cli, tmp_path):
    out = tmp_path / "out"
    result = cli("apply", write_plan(tmp_path, f"model: {ref}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 1]\n"))
    assert result.code == 0, result.err
    source = json.loads((out / "surgery.json").read_text())["sources"][ref]
    assert source["hub_id"] == "org/tiny" and source["revision"] == COMMIT
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/tiny"] and f"org/tiny@{COMMIT[:12]}" in card.text


def test_a_hub_merge_says_its_relation_and_a_hub_quantization_too(hub_cache, cli, tmp_path):
    out = tmp_path / "bits"
    assert cli("apply", write_plan(tmp_path, f"model: org/tiny\noutput: {out}\nsteps:\n  - op: bits\n    score: zd\n"
                                   "    assign: {high: 8, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 16}\n")
               ).code == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/tiny"] and card.data.base_model_relation == "quantized"


def test_the_command_line_takes_hub_ids_and_demo_models(hub_cache, cli):
    result = cli("inspect", "org/tiny", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["layers"] > 0
    assert cli("inspect", "demo:tiny-llama").code == 0
    result = cli("diff", "org/tiny", str(hub_cache), "--json")
    assert result.code == 0, result.err


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(hub_cache, cli, tmp_path, tiny, monkeypatch):
    shutil.copytree(tiny("llama"), tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert cli("apply", write_plan(tmp_path, f"model: org/tiny\noutput: {out}\nsteps:\n  - op: chain\n"
                                   "    layers: [0]\n")).code == 0
    assert "hub_id" not in json.loads((out / "surgery.json").read_text())["sources"]["org/tiny"]


def test_offline_and_not_cached_is_one_line_with_the_download_command(hub_cache, cli, tmp_path):
    result = cli("inspect", "org/missing@v2")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "hf download org/missing --revision v2" in result.err and "HF_HUB_OFFLINE" in result.err


def test_a_missing_folder_spelled_like_a_hub_id_names_the_folder_it_looked_for(hub_cache, cli, tmp_path):
    """`models/prose` in a plan may be a folder beside it that is not there: the one line says where it looked."""
    result = cli("apply", write_plan(tmp_path, f"model: models/prose\noutput: {tmp_path / 'out'}\nsteps:\n"
                                     "  - op: chain\n    layers: [0]\n"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert f"no folder {tmp_path / 'models' / 'prose'}" in result.err and "hf download models/prose" in result.err
    assert not (tmp_path / "out").exists()
