"""Merging models whose vocabularies differ: a fine-tune with added tokens (resized embeddings, made with
transformers' own add_tokens and resize_token_embeddings) and one whose tokenizer numbers two tokens the
other way round (rows swapped to match). Each merge with `tokenizer:` is checked against the same merge of
the models as they were before (the rows the output must hold are known independently), and without it
the merge is refused, also where the sizes agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.demo_models import demo_model
from tests.conftest import listing, write_plan
from tests.test_task_vectors import _weights

ADDED = ["<|tool|>", "<|/tool|>", "zebrafish"]
SWAPPED = (100, 101)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _with_added_tokens(source: Path, dest: Path) -> Path:
    """The model with ADDED in its tokenizer (the first two special) and seeded rows for them."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_tokens([AddedToken(token, special=True) for token in ADDED[:2]] + ADDED[2:])
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:] = torch.randn(weight[old:].shape, generator=g) * 0.05
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def _renumbered(source: Path, dest: Path) -> Path:
    """The same model with two tokens' ids exchanged in its tokenizer, and their rows exchanged to match."""
    shutil.copytree(source, dest)
    data = json.loads((dest / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == index) for index in SWAPPED)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(data))
    tensors = load_file(dest / "model.safetensors")
    for name in (EMBED, HEAD):
        tensors[name][list(SWAPPED)] = tensors[name][list(reversed(SWAPPED))].clone()
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    found = {name: demo_model(name) for name in ("base", "prose", "code")}
    found["plus"] = _with_added_tokens(found["prose"], folder / "plus")
    found["renumbered"] = _renumbered(found["prose"], folder / "renumbered")
    return found


def _apply(cli, folder: Path, text: str, name: str, *extra: str) -> Path:
    out = folder / name
    plan = write_plan(folder, f"output: {out}\n{text}", f"{name}.yaml")
    result = cli("apply", plan, "--no-fsync", *extra)
    assert result.code == 0, result.err
    return out


def _task_arithmetic(models: dict, first: str, tokenizer: str | None = None) -> str:
    setting = f"    tokenizer: {tokenizer}\n" if tokenizer else ""
    return (f"base: {models['base']}\nsteps:\n  - op: task_arithmetic\n{setting}    models:\n"
            f"      - {{model: {models[first]}, weight: 0.7}}\n      - {{model: {models['code']}, weight: 0.4}}\n")


@pytest.mark.parametrize("plan", ["task_arithmetic", "linear", "ties"])
def test_without_tokenizer_differing_vocabularies_are_refused_even_at_one_size(models, cli, tmp_path, plan):
    text = {"task_arithmetic": _task_arithmetic(models, "renumbered"),
            "linear": f"steps:\n  - op: linear\n    models: [{models['code']}, {models['renumbered']}]\n",
            "ties": _task_arithmetic(models, "plus").replace("task_arithmetic", "ties")}[plan]
    written = write_plan(tmp_path, f"output: {tmp_path / 'out'}\n{text}")
    result = cli("apply", written)
    assert result.code == 2 and "the models' vocabularies differ" in result.err, result.err
    assert "set the step's 'tokenizer:' to base, union or one of the models" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert listing(tmp_path) == ["plan.yaml"]


def test_rows_aligned_by_token_make_the_merge_of_the_models_as_they_were(models, cli, tmp_path):
    """The renumbered model is the prose model: aligned by token, every merge of it is the prose merge."""
    want = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "prose"), "want"))
    got = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "renumbered", "base"), "got"))
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    linear = "steps:\n  - op: linear\n    tokenizer: base\n    models: [{code}, {other}]\n"
    want = _weights(_apply(cli, tmp_path, linear.format(code=models["code"], other=models["prose"]), "lw"))
    got = _weights(_apply(cli, tmp_path, linear.format(code=models["code"], other=models["renumbered"]), "lg"))
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_union_keeps_every_token_and_its_row(models, cli, tmp_path):
    """The base's vocabulary, then the added tokens: their rows are the fine-tune's own (the only model that
    has them); every other row is the merge of the models without them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    want = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "prose"), "want"))
    out = _apply(cli, tmp_path, _task_arithmetic(models, "plus", "union"), "union")
    got, plus = _weights(out), _weights(models["plus"])
    rows = want[EMBED].shape[0]
    for name in want:
        if name in (EMBED, HEAD):
            assert torch.equal(got[name][:rows], want[name]), name
            assert torch.equal(got[name][rows:], plus[name][rows:]), name
        else:
            assert torch.equal(got[name], want[name]), name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows + len(ADDED)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(models["plus"])).get_vocab()
    assert {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}["<|tool|>"] is True
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tokenizer("<|tool|> def zebrafish():", return_tensors="pt").input_ids
    assert ids.max() >= rows and model(ids).logits.shape[-1] == rows + len(ADDED)


def test_a_models_tokenizer_is_written_as_it_is(models, cli, tmp_path):
    out = _apply(cli, tmp_path, _task_arithmetic(models, "plus", str(models["plus"])), "theirs")
    assert (out / "tokenizer.json").read_bytes() == (models["plus"] / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == json.loads(
        (models["plus"] / "config.json").read_text())["vocab_size"]
    base_rows = _weights(models["base"])[EMBED].shape[0]
    assert torch.equal(_weights(out)[EMBED][base_rows:], _weights(models["plus"])[EMBED][base_rows:])


def test_base_keeps_the_bases_vocabulary_and_drops_the_added_tokens(models, cli, tmp_path):
    want = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "prose"), "want"))
    got = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "plus", "base"), "base"))
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_the_gather_streams_the_same_on_any_block_size(models, cli, tmp_path, monkeypatch):
    import surgery.recipe.stream as stream

    want = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "renumbered", "union"), "big"))
    monkeypatch.setattr(stream, "CPU_BLOCK_ELEMENTS", 97)  # a block ends inside a row, runs inside a block
    got = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "renumbered", "union"), "small"))
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_a_tokenizer_not_in_the_merge_is_refused(models, cli, tmp_path):
    written = write_plan(tmp_path, f"output: {tmp_path / 'out'}\n" + _task_arithmetic(models, "plus", "some/other"))
    result = cli("apply", written)
    assert result.code == 2 and "tokenizer 'some/other' is not one of the merge's models" in result.err


def test_the_ensemble_checks_vocabularies_by_token(models, cli, tmp_path):
    written = write_plan(tmp_path, f"output: {tmp_path / 'out'}\nsteps:\n  - op: ensemble\n"
                         f"    members: [{models['prose']}, {models['renumbered']}]\n")
    result = cli("apply", written)
    assert result.code == 2 and "ensemble: the models' vocabularies differ (token '" in result.err, result.err


def test_a_mergekit_tokenizer_source_translates(models, cli, tmp_path):
    config = write_plan(tmp_path, f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
                        f"tokenizer_source: union\nmodels:\n  - {{model: {models['plus']}, parameters: {{weight: 0.7}}}}\n"
                        f"  - {{model: {models['code']}, parameters: {{weight: 0.4}}}}\n", "merge.yaml")
    result = cli("apply", config, "--out", tmp_path / "mk", "--no-fsync")
    assert result.code == 0, result.err
    want = _weights(_apply(cli, tmp_path, _task_arithmetic(models, "plus", "union"), "by-hand"))
    got = _weights(tmp_path / "mk")
    assert all(torch.equal(want[n], got[n]) for n in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_aligned_rows_gather_the_same_on_cuda(models, cli, tmp_path):
    from tests.conftest import outputs_on_devices

    outputs = outputs_on_devices(cli, tmp_path, _task_arithmetic(models, "plus", "union"))
    for name, tensor in outputs["cpu"].items():
        torch.testing.assert_close(outputs["cuda"][name], tensor, rtol=1e-6, atol=1e-6)
