"""`surgery eval`: perplexity equal to a direct transformers computation, and clear errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.demo_models.models import ENCODERS
from surgery.evaluation.perplexity import plan_windows
from tests.conftest import ARCHS, listing, write_plan

TEXT = "The quick brown fox jumps over the lazy dog. " * 20 + "def f(x):\n    return x * 2\n" * 10


def reference_perplexity(folder, text: str, window: int, stride: int, max_tokens: int) -> tuple[float, int]:
    """The strided recipe from the transformers docs, counting each scored label exactly."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids[:, :max_tokens]
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        target_length = end - previous_end
        inputs = ids[:, begin:end]
        labels = inputs.clone()
        labels[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(input_ids=inputs, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll += loss.item() * valid
        count += valid
        previous_end = end
        if end == ids.size(1):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize(("window", "stride"), [(64, 32), (64, 64), (50, 7), (512, 256)])
def test_perplexity_equals_direct_transformers_computation(window, stride, cli, tmp_path):
    from surgery.demo_models import demo_model

    folder = demo_model("base")
    (tmp_path / "text.txt").write_text(TEXT)
    result = cli("eval", folder, "--data", tmp_path / "text.txt", "--window", window, "--stride", stride,
                 "--max-tokens", 300, "--json", "--device", "cpu", "--batch-size", 3)
    assert result.code == 0, result.err
    data = json.loads(result.out)
    expected, count = reference_perplexity(folder, TEXT, window, stride, 300)
    assert data["tokens"] == count
    assert count == (299 if stride < window else 299 - (299 // window))  # window starts lack context
    assert data["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert data["device"] == "cpu" and data["tokens_per_second"] > 0


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ENCODERS])
def test_every_causal_architecture_is_scored(arch, tiny, cli, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    result = cli("eval", tiny(arch), "--data", tmp_path / "text.txt", "--window", 32, "--json")
    assert result.code == 0, result.err
    expected, _ = reference_perplexity(tiny(arch), TEXT, 32, 16, 8192)
    assert json.loads(result.out)["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_compare_scores_the_base_on_the_same_tokens(cli):
    from surgery.demo_models import demo_model

    result = cli("eval", demo_model("prose"), "--compare", demo_model("base"), "--data", "builtin:prose-heldout",
                 "--data", "builtin:code-heldout", "--max-tokens", 2048, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    prose, code = data["datasets"]
    # the prose specialist beats its base on held-out prose and loses to it on code
    assert prose["perplexity"] < prose["base_perplexity"] and code["perplexity"] > code["base_perplexity"]
    assert data["delta"] == pytest.approx(data["perplexity"] - data["base_perplexity"])
    pooled = math.exp((math.log(prose["perplexity"]) * prose["tokens"] + math.log(code["perplexity"]) * code["tokens"])
                      / (prose["tokens"] + code["tokens"]))
    assert data["perplexity"] == pytest.approx(pooled)


def test_batch_size_does_not_change_the_score(cli):
    from surgery.demo_models import demo_model

    scores = [
        json.loads(cli("eval", demo_model("base"), "--max-tokens", 1500, "--window", 256, "--batch-size", b,
                       "--json").out)["perplexity"]
        for b in (1, 5)
    ]
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)


@pytest.mark.parametrize("n", [2, 3, 10, 100, 257])
@pytest.mark.parametrize(("window", "stride"), [(2, 1), (2, 2), (8, 3), (8, 8), (16, 5), (300, 150)])
def test_each_token_is_scored_once(n, window, stride):
    scored = [p for w in plan_windows(n, window, stride) for p in range(w.score_from, w.end)]
    windows = plan_windows(n, window, stride)
    assert all(w.end - w.begin <= window and w.begin < w.score_from for w in windows)
    if stride < window:
        assert scored == list(range(1, n))
    else:  # no overlap: the first token of each window has no context and is not scored
        assert sorted(scored) == [p for p in range(1, n) if p % window != 0]


def test_jsonl_data(cli, tmp_path):
    from surgery.demo_models import demo_model

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": TEXT[:400]}) + "\n\n" + json.dumps({"text": TEXT[400:]}) + "\n")
    result = cli("eval", demo_model("base"), "--data", tmp_path / "d.jsonl", "--json")
    assert result.code == 0, result.err
    (tmp_path / "d.txt").write_text(TEXT[:400] + "\n\n" + TEXT[400:])
    assert json.loads(result.out)["perplexity"] == json.loads(cli("eval", demo_model("base"), "--data",
                                                                  tmp_path / "d.txt", "--json").out)["perplexity"]


def _fails(result, *needles):
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for needle in needles:
        assert needle in lines[0]


def test_bad_eval_input(tiny, cli, tmp_path):
    from surgery.demo_models import demo_model

    base = demo_model("base")
    (tmp_path / "empty.txt").write_text("")
    _fails(cli("eval", base, "--data", tmp_path / "empty.txt"), "empty.txt", "at least 2")
    (tmp_path / "one.txt").write_text("a")
    _fails(cli("eval", base, "--data", tmp_path / "one.txt"), "1 token", "at least 2")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    _fails(cli("eval", base, "--data", tmp_path / "blob.bin"), "blob.bin", "not UTF-8 text")
    _fails(cli("eval", base, "--data", tmp_path / "absent.txt"), "absent.txt", "does not exist")
    _fails(cli("eval", base, "--data", "builtin:poetry"), "unknown built-in data", "builtin:prose-heldout")
    _fails(cli("eval", base, "--device", "tpu"), "unknown device 'tpu'")
    _fails(cli("eval", base, "--dtype", "int3"), "unknown dtype 'int3'")
    _fails(cli("eval", tiny("bert")), "BertModel", "causal LM")
    _fails(cli("eval", tmp_path / "nothing"), "does not exist")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(base, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    _fails(cli("eval", no_tokenizer), "no tokenizer files")
    if not torch.cuda.is_available():
        _fails(cli("eval", base, "--device", "cuda"), "no CUDA device")


def test_plan_evaluate_section_scores_output_and_reference(cli, tmp_path):
    from surgery.demo_models import demo_model

    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"""
model: {demo_model("base")}
output: {out}
steps:
  - op: chain
    layers: [0-4, 7]
evaluate:
  data: [builtin:prose-heldout, builtin:code-heldout]
  max_tokens: 1024
  compare_to: model
""")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    assert "builtin:prose-heldout" in result.out and "reference" in result.out
    record = json.loads((out / "surgery.json").read_text())["evaluation"]
    assert record["base"] == str(demo_model("base")) and len(record["datasets"]) == 2
    direct = json.loads(cli("eval", out, "--data", "builtin:prose-heldout", "--data", "builtin:code-heldout",
                            "--max-tokens", 1024, "--compare", demo_model("base"), "--json").out)
    assert record["perplexity"] == pytest.approx(direct["perplexity"])
    assert record["base_perplexity"] == pytest.approx(direct["base_perplexity"])
    assert record["perplexity"] > record["base_perplexity"]  # dropping two layers costs something


def test_evaluating_an_encoder_is_refused_before_writing(tiny, cli, tmp_path):
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {tiny('bert')}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 1]\n"
                                "evaluate: {max_tokens: 64}\n")
    before = listing(tmp_path)
    result = cli("apply", plan)
    _fails(result, "causal LM")
    assert listing(tmp_path) == before  # validated before anything is written


def test_eval_of_a_surgery_output_compares_with_its_source(tiny, cli, tmp_path):
    out = tmp_path / "out"
    write_plan(tmp_path, f"model: {tiny('llama')}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 2]\n")
    assert cli("apply", tmp_path / "plan.yaml").code == 0
    data = json.loads(cli("eval", out, "--max-tokens", 256, "--json").out)
    assert data["base"] == str(tiny("llama")) and "base_perplexity" in data
    alone = json.loads(cli("eval", out, "--max-tokens", 256, "--json", "--no-compare").out)
    assert "base" not in alone and alone["perplexity"] == data["perplexity"]


def test_reference_with_another_tokenizer_is_refused(cli, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from surgery.demo_models import demo_model

    other = tmp_path / "other"
    shutil.copytree(demo_model("base"), other)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(other)
    _fails(cli("eval", demo_model("base"), "--compare", other, "--max-tokens", 64), "tokenizes builtin differently")
