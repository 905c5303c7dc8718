"""The model card (README.md) every output folder carries."""

from __future__ import annotations

from huggingface_hub import ModelCard

from surgery.demo_models import demo_model
from surgery.output.card import source_id
from surgery.plan.references import HubOrigin, hub_origin
from tests.conftest import write_plan


def _card(cli, tmp_path, body: str, name: str) -> ModelCard:
    out = tmp_path / name
    result = cli("apply", write_plan(tmp_path, f"output: {out}\n{body}", f"{name}.yaml"))
    assert result.code == 0, result.err
    return ModelCard.load(out / "README.md")


def test_hub_downloads_are_named_by_their_repo_id_and_commit():
    commit = "0e9e39f249a16976918f6564b8830bc894c89659"
    cache = f"/home/me/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/{commit}/"
    assert hub_origin(cache) == HubOrigin("meta-llama/Llama-3.1-8B", commit)
    assert hub_origin("/data/my-model") is None
    assert source_id({"path": cache, "hub_id": "meta-llama/Llama-3.1-8B", "revision": commit}) == \
        "meta-llama/Llama-3.1-8B@0e9e39f249a1"
    assert source_id({"path": "/data/my-model"}) == "/data/my-model"


def test_cards_describe_each_kind_of_output(cli, tmp_path, tiny):
    base, prose, code, llama = demo_model("base"), demo_model("prose"), demo_model("code"), tiny("llama")
    chain = _card(cli, tmp_path, f"model: {llama}\nsteps:\n  - op: chain\n    layers: [0, 0, 1]\n", "chain")
    assert chain.data.get("base_model") is None and chain.data.library_name == "transformers"  # a path is no Hub id
    assert str(llama) in chain.text
    assert chain.data.get("base_model_relation") is None and chain.data.tags == ["surgery", "chain"]
    assert "source layers 0, 0, 1" in chain.text and "AutoModelForCausalLM" in chain.text and "op: chain" in chain.text
    assert "Methods: CoLa, Li et al. 2025" in chain.text  # each op names its paper

    ties = _card(cli, tmp_path, f"base: {base}\nsteps:\n  - op: ties\n    models: [{prose}, {code}]\n", "ties")
    assert ties.data.get("base_model") is None and ties.data.get("base_model_relation") is None  # local sources
    assert all(f"`{m}`" in ties.text for m in (base, prose, code))  # each source named in the text, by its path

    compact = _card(cli, tmp_path, f"model: {base}\nsteps:\n  - op: tie\n    loops: 2\n", "tie")
    assert compact.data.library_name is None and "load_for_eval" in compact.text and "surgery materialize" in compact.text

    ensemble = _card(cli, tmp_path, f"steps:\n  - op: ensemble\n    members: [{prose}, {code}]\n", "ensemble")
    assert "combining logits" in ensemble.text

    bits = _card(cli, tmp_path, f"model: {base}\nsteps:\n  - op: bits\n    score: zd\n"
                 "    assign: {high: 8, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 32}\n", "bits")
    assert "ranked by zd" in bits.text


def test_the_card_loads_from_the_outputs_real_path(cli, tmp_path, tiny):
    card = _card(cli, tmp_path, f"model: {tiny('llama')}\nsteps:\n  - op: chain\n    layers: [0, 1]\n", "real")
    assert f"from_pretrained({str((tmp_path / 'real').resolve())!r})" in card.text and "PATH" not in card.text
