"""Every architecture transformers ships: an exact edit, or a refusal before anything is written.

Each model type's tiny random checkpoint (surgery/demo_models/zoo.py, cached) goes through drop,
loop and reorder; the output must load with no key problems and give the logits of the same edit
done in memory on the transformers module, or surgery must refuse in one line. docs/architectures.md
is generated from the same run (benchmarks/architectures.py) and must still say what this finds.
"""

from __future__ import annotations

import json

import pytest
import transformers
from safetensors import safe_open

from benchmarks.architectures import report, row
from surgery.checkpoint import config as layer_config
from surgery.demo_models.zoo import tiny_checkpoint, zoo, zoo_types
from tests.conftest import REPO, write_plan

ZOO = zoo_types()
PAGE = REPO / "docs" / "architectures.md"


@pytest.fixture(scope="session")
def entries():
    return {entry.model_type: entry for entry in zoo(ZOO)}


@pytest.fixture(scope="session")
def page() -> tuple[str | None, dict[str, list[str]]]:
    """The page's transformers version and its table rows by model type."""
    text = PAGE.read_text()
    version = next((line.split()[1].rstrip(":") for line in text.splitlines() if line.startswith("transformers ")), None)
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| model type"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return version, rows


@pytest.fixture
def checkpoint(entries):
    def build(model_type):
        entry = entries[model_type]
        assert entry.config is not None, entry.problem
        return tiny_checkpoint(entry)
    return build


@pytest.mark.parametrize("model_type", ZOO)
def test_every_edit_is_exact_or_refused_in_one_line(model_type, entries, page, tmp_path):
    found = report(entries[model_type], tmp_path)
    for result in found.results:
        assert result.outcome in ("exact", "refused"), f"{model_type} {result.edit}: {result.detail}"
        assert "\n" not in result.detail
    version, rows = page
    if version == transformers.__version__:  # the page was generated with this transformers
        assert rows.get(model_type) == row(found), "docs/architectures.md is stale: python benchmarks/architectures.py"


def test_the_page_covers_every_model_type_of_its_transformers(page):
    version, rows = page
    if version != transformers.__version__:
        pytest.skip(f"docs/architectures.md was generated with transformers {version}")
    assert sorted(rows) == ZOO


def test_a_dense_prefix_follows_its_layers_or_refuses(cli, checkpoint, tmp_path):
    """DeepSeek-V3's first_k_dense_replace=1: dropping layer 0 leaves no dense layer (k becomes 0);
    a dense layer after an MoE one cannot be described, and nothing is written."""
    source = checkpoint("deepseek_v3")
    out = tmp_path / "drop0"
    plan = write_plan(tmp_path, f"model: {source}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [1-3]\n")
    assert cli("apply", plan).code == 0
    assert json.loads((out / "config.json").read_text())["first_k_dense_replace"] == 0

    bad = tmp_path / "bad"
    plan = write_plan(tmp_path, f"model: {source}\noutput: {bad}\nsteps:\n  - op: chain\n    layers: [1, 0, 2, 3]\n")
    result = cli("apply", plan)
    assert result.code == 2 and "first_k_dense_replace" in result.err and len(result.err.strip().splitlines()) == 1
    assert not bad.exists()
    check = cli("check", plan)
    assert check.code == 2 and check.err == result.err


def test_a_rule_surgery_does_not_know_is_caught_by_transformers_build(cli, checkpoint, tmp_path, monkeypatch):
    """The safety net: with the dense-prefix rule unknown, dropping layer 0 would put an MoE layer's
    tensors where transformers builds a dense MLP; the meta-device check refuses it."""
    rules = tuple(r for r in layer_config.RULES if not isinstance(r, layer_config.PrefixRule))
    monkeypatch.setattr(layer_config, "RULES", rules)
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {checkpoint('deepseek_v3')}\noutput: {out}\nsteps:\n  - op: chain\n"
                      "    layers: [1-3]\n")
    result = cli("apply", plan)
    assert result.code == 2 and not out.exists()
    assert "output layer 0" in result.err and "DeepseekV3MoE" in result.err and "DeepseekV3MLP" in result.err


def test_a_second_layer_count_is_rewritten_or_the_edit_refused(cli, checkpoint, tmp_path, monkeypatch):
    """xLSTM builds `num_blocks` blocks beside `num_hidden_layers`: both follow the edit; were the
    second count unknown, transformers would build the old count and the check refuses (no crash)."""
    source = checkpoint("xlstm")
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {source}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 1, 2, 1, 2, 3]\n")
    assert cli("apply", plan).code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_blocks"] == config["num_hidden_layers"] == 6

    monkeypatch.setattr(layer_config, "COUNT_ALIASES", {})
    again = tmp_path / "again"
    plan = write_plan(tmp_path, f"model: {source}\noutput: {again}\nsteps:\n  - op: chain\n    layers: [0, 1, 3]\n")
    result = cli("apply", plan)
    assert result.code == 2 and not again.exists()
    assert "transformers would build 4 layers from the output config where the plan writes 3" in result.err


def test_periodic_layers_refuse_an_order_no_period_describes(cli, checkpoint, tmp_path):
    plan = write_plan(tmp_path, f"model: {checkpoint('jamba')}\noutput: {tmp_path / 'out'}\nsteps:\n"
                      "  - op: chain\n    layers: [0, 1, 3]\n")
    result = cli("apply", plan)
    assert result.code == 2 and "expert_layer_period" in result.err and not (tmp_path / "out").exists()


def test_a_pattern_of_block_types_is_written_out_per_layer(cli, checkpoint, tmp_path):
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {checkpoint('recurrent_gemma')}\noutput: {out}\nsteps:\n"
                      "  - op: chain\n    layers: [2, 0, 1, 3]\n")
    assert cli("apply", plan).code == 0
    source = json.loads((checkpoint("recurrent_gemma") / "config.json").read_text())["block_types"]
    written = json.loads((out / "config.json").read_text())["block_types"]
    assert written == [source[i % len(source)] for i in (2, 0, 1, 3)]


def test_a_vlm_edits_its_language_model_and_copies_the_vision_tower_byte_for_byte(cli, checkpoint, tmp_path):
    source = checkpoint("gemma3")
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {source}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 2, 3]\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3 and len(config["text_config"]["layer_types"]) == 3
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        vision = [n for n in a.keys() if not n.startswith("language_model.model.layers.")]
        assert any("vision_tower" in n for n in vision)
        for name in vision:
            assert a.get_tensor(name).equal(b.get_tensor(name)), name
    assert "Gemma3ForConditionalGeneration" in json.loads((out / "surgery.json").read_text())["structure"]


def test_inspect_shows_every_stack(cli, checkpoint):
    result = cli("inspect", checkpoint("gemma3"), "--json")
    assert result.code == 0, result.err
    stacks = {s["name"]: s for s in json.loads(result.out)["stacks"]}
    assert stacks["text"]["prefix"] == "language_model.model.layers" and stacks["text"]["edited"]
    assert stacks["vision"]["prefix"] == "vision_tower.encoder.layers" and not stacks["vision"]["edited"]


def test_a_model_type_transformers_does_not_ship_is_edited_unverified(cli, tiny, tmp_path):
    """Only the layer count changes in its config, and the record says the structure was not verified."""
    import shutil

    source = tmp_path / "custom"
    shutil.copytree(tiny("llama"), source)
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="my_private_llama", architectures=["MyPrivateLlamaForCausalLM"])
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = cli("apply", write_plan(tmp_path, f"model: {source}\noutput: {out}\nsteps:\n  - op: chain\n"
                                     "    layers: [0, 1, 3]\n"))
    assert result.code == 0, result.err
    assert json.loads((out / "surgery.json").read_text())["structure"].startswith("not verified")


def test_a_plan_can_edit_the_vision_tower_of_a_vlm(cli, checkpoint, tmp_path):
    """`stack: vision` drops a vision layer: image features equal the same edit in memory, and the
    language model is copied byte for byte."""
    import torch
    from transformers import AutoModelForImageTextToText

    source = checkpoint("gemma3")
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {source}\noutput: {out}\nstack: vision\nsteps:\n  - op: chain\n"
                      "    layers: [0, 1, 3]\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 3
    reference = AutoModelForImageTextToText.from_pretrained(source).eval()
    layers = reference.model.vision_tower.encoder.layers
    reference.model.vision_tower.encoder.layers = torch.nn.ModuleList([layers[i] for i in (0, 1, 3)])
    edited = AutoModelForImageTextToText.from_pretrained(out).eval()
    size = reference.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.model.get_image_features(pixel_values=pixels).pooler_output
        got = edited.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.equal(got, expected)
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        for name in (n for n in a.keys() if n.startswith("language_model.")):
            assert a.get_tensor(name).equal(b.get_tensor(name)), name


def test_a_plan_names_the_decoder_of_an_encoder_decoder_model(cli, tmp_path):
    """T5 has two stacks of one size: a plan must say which; dropping a decoder layer gives the logits of
    the same edit in memory, and dropping layer 0 (it alone holds the relative position bias) is refused."""
    import torch
    from transformers import AutoConfig, T5ForConditionalGeneration

    from surgery.demo_models.zoo import shrunk

    values = shrunk(AutoConfig.for_model("t5").to_dict())
    values.pop("model_type")
    torch.manual_seed(0)
    source = tmp_path / "t5"
    T5ForConditionalGeneration(AutoConfig.for_model("t5", **values)).save_pretrained(source)
    chain = "steps:\n  - op: chain\n    layers: [0, 1, 3]\n"
    result = cli("apply", write_plan(tmp_path, f"model: {source}\noutput: {tmp_path / 'x'}\n{chain}", "a.yaml"))
    assert result.code == 2 and "stack: NAME" in result.err and "decoder" in result.err

    out = tmp_path / "out"
    result = cli("apply", write_plan(tmp_path, f"model: {source}\noutput: {out}\nstack: decoder\n{chain}", "b.yaml"))
    assert result.code == 0, result.err
    assert json.loads((out / "config.json").read_text())["num_decoder_layers"] == 3
    reference = T5ForConditionalGeneration.from_pretrained(source).eval()
    reference.decoder.block = torch.nn.ModuleList([reference.decoder.block[i] for i in (0, 1, 3)])
    edited = T5ForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids, decoder_input_ids=ids).logits
        got = edited(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(got, expected)

    plan = f"model: {source}\noutput: {tmp_path / 'y'}\nstack: decoder\nsteps:\n  - op: chain\n    layers: [1-3]\n"
    result = cli("apply", write_plan(tmp_path, plan, "c.yaml"))
    assert result.code == 2 and "output layer 0" in result.err and not (tmp_path / "y").exists()


def test_a_stack_is_refused_for_steps_that_run_the_language_model(cli, tiny, tmp_path):
    plan = write_plan(tmp_path, f"model: {tiny('llama')}\noutput: {tmp_path / 'out'}\nstack: vision\nsteps:\n"
                      "  - op: tie\n    loops: 2\n")
    result = cli("check", plan)
    assert result.code == 2 and "edits the language model only" in result.err
    plan = write_plan(tmp_path, f"model: {tiny('llama')}\noutput: {tmp_path / 'out'}\nstack: vision\nsteps:\n"
                      "  - op: chain\n    layers: [0]\n")
    result = cli("check", plan)
    assert result.code == 2 and "no 'vision' stack" in result.err


def test_settings_keyed_by_layer_index_follow_their_layers(tmp_path):
    """Gemma 4's `per_layer_config` keys its overrides by layer ("05"): they move with their layers,
    keys written as they were."""
    config = {"model_type": "x", "num_hidden_layers": 12, "per_layer_config": {"05": {"head_dim": 512}, "11": {"head_dim": 512}}}
    layers = layer_config.per_layer_values(config, 12, tmp_path)
    order = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 5]  # layer 5 moved last, layer 11 now at 10
    out = layer_config.rewrite_config(config, "num_hidden_layers", [layers[i] for i in order])
    assert out["per_layer_config"] == {"10": {"head_dim": 512}, "11": {"head_dim": 512}}
    assert config["per_layer_config"] == {"05": {"head_dim": 512}, "11": {"head_dim": 512}}  # the source's untouched


def test_tying_a_vlm_is_refused_in_the_compact_format(cli, checkpoint, tmp_path):
    """The compact recursive format reads its layer count from the top of config.json: a VLM's is in
    text_config, so a compact output would not load back; it is refused before writing."""
    plan = write_plan(tmp_path, f"model: {checkpoint('gemma3')}\noutput: {tmp_path / 'out'}\nsteps:\n"
                      "  - op: tie\n    loops: 2\n")
    result = cli("apply", plan)
    assert result.code == 2 and "text_config.num_hidden_layers" in result.err and "materialized" in result.err
    assert not (tmp_path / "out").exists()
