"""`ensemble`: logit averaging of models sharing a tokenizer, against the members' own logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.demo_models import demo_model
from surgery.evaluation.loading import load_for_eval
from tests.conftest import listing, write_plan
from tests.reference import load, outputs

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3, 11, 250, 42, 8, 90, 31]])


def _ensemble(cli, tmp_path: Path, members: list[Path], extra: str = "", name: str = "out") -> Path:
    out = tmp_path / name
    body = f"output: {out}\nsteps:\n  - op: ensemble\n    members: [{', '.join(map(str, members))}]\n{extra}"
    result = cli("apply", write_plan(tmp_path, body, f"{name}.yaml"))
    assert result.code == 0, result.err
    return out


def _logits(folder: Path) -> torch.Tensor:
    return outputs(load_for_eval(folder, device="cpu", dtype="float32").model, IDS)


@pytest.mark.parametrize("layout", ["reference", "copy"])
def test_logits_are_the_weighted_mean_of_the_members(layout, cli, tmp_path, tiny):
    # members may differ in depth and width: the 8-layer demo specialists and a 2-layer tiny Llama
    members = [demo_model("prose"), demo_model("code"), tiny("llama")]
    out = _ensemble(cli, tmp_path, members, f"    weights: [2, 1, 1]\n    layout: {layout}\n")
    mine = [outputs(load(m), IDS).double() for m in members]
    expected = (2 * mine[0] + mine[1] + mine[2]) / 4
    assert (_logits(out).double() - expected).abs().max() <= 1e-5
    assert listing(out).count("model.safetensors") == (1 if layout == "copy" else 0)


def test_probs_combine_is_the_mixture(cli, tmp_path):
    members = [demo_model("prose"), demo_model("code")]
    out = _ensemble(cli, tmp_path, members, "    weights: [0.25, 0.75]\n    combine: probs\n")
    probs = [torch.softmax(outputs(load(m), IDS).double(), -1) for m in members]
    mixture = 0.25 * probs[0] + 0.75 * probs[1]
    combined = _logits(out).double()
    assert torch.allclose(torch.softmax(combined, -1), mixture, atol=1e-6)
    assert torch.allclose(combined, mixture.log(), atol=1e-4)  # log-probabilities, not just proportional


def test_greedy_generation_follows_the_combined_logits(cli, tmp_path):
    out = _ensemble(cli, tmp_path, [demo_model("prose"), demo_model("code")])
    model = load_for_eval(out, device="cpu", dtype="float32").model
    tokens = model.generate(IDS[:, :5], max_new_tokens=8)
    expected = IDS[:, :5]
    for _ in range(8):  # cache-free reference: the argmax of the full forward pass at the last position
        expected = torch.cat([expected, outputs(model, expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, expected)


def test_shared_embeddings_are_stored_once(cli, tmp_path):
    """Specialists on one frozen embedding (the paper's substrate): the copy layout stores it once."""
    prose = demo_model("prose")
    twin = tmp_path / "twin"
    shutil.copytree(prose, twin)
    tensors = load_file(prose / "model.safetensors")
    changed = {k: (v * 1.01 if k.startswith("model.layers.") else v) for k, v in tensors.items()}
    save_file(changed, twin / "model.safetensors", metadata={"format": "pt"})
    out = _ensemble(cli, tmp_path, [prose, twin], "    layout: copy\n")
    config = json.loads((out / "config.json").read_text())["surgery_ensemble"]
    assert config["aliases"] == {f"members.1.{n}": f"members.0.{n}" for n in ("lm_head.weight", "model.embed_tokens.weight",
                                                                            "model.norm.weight")}
    stored = load_file(out / "model.safetensors")
    assert "members.1.model.embed_tokens.weight" not in stored and "members.0.model.embed_tokens.weight" in stored
    expected = (outputs(load(prose), IDS) + outputs(load(twin), IDS)) / 2
    assert (_logits(out) - expected).abs().max() <= 1e-5


def test_reference_layout_notices_a_changed_member(cli, tmp_path):
    member = tmp_path / "member"
    shutil.copytree(demo_model("code"), member)
    out = _ensemble(cli, tmp_path, [demo_model("prose"), member])
    assert cli("eval", out, "--max-tokens", "256", "--device", "cpu").code == 0
    tensors = load_file(member / "model.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, member / "model.safetensors", metadata={"format": "pt"})
    result = cli("eval", out, "--max-tokens", "256", "--device", "cpu")
    assert result.code == 2 and "changed since the ensemble was made" in result.err


def _other_tokenizer(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    shutil.copytree(demo_model("code"), other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(data))
    return other


@pytest.mark.parametrize("step, message", [
    ("    members: [{prose}, {other}]\n", "ensemble: the models' vocabularies differ (token '<|endoftext|>' is"),
    ("    members: [{prose}, {code}]\n    weights: [1]\n", "1 weights for 2 members"),
    ("    members: [{prose}, {code}]\n    weights: [1, -1]\n", "weights sum to 0; they must sum to a positive number"),
    ("    members: [{prose}, {code}]\n    weights: [2, -1]\n    combine: probs\n", "weights must not be negative"),
    ("    members: [{prose}, {missing}]\n", "does not exist"),
    ("    members: [{prose}, {code}]\n  - op: chain\n    layers: [0-3]\n", "must be the plan's only step"),
])
def test_bad_ensemble_plans(step, message, cli, tmp_path):
    paths = {"prose": demo_model("prose"), "code": demo_model("code"), "other": _other_tokenizer(tmp_path),
             "missing": tmp_path / "missing"}
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"output: {out}\nsteps:\n  - op: ensemble\n" + step.format(**paths))
    result = cli("apply", plan)
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()


def test_model_key_is_refused(cli, tmp_path):
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'o'}\nsteps:\n  - op: ensemble\n"
                      f"    members: [{demo_model('prose')}]\n")
    result = cli("apply", plan)
    assert result.code == 2 and "leave 'model:' out" in result.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ensemble_on_cuda_equals_cpu(cli, tmp_path):
    out = _ensemble(cli, tmp_path, [demo_model("prose"), demo_model("code")], "    combine: probs\n")
    model = load_for_eval(out, device="cuda", dtype="float32").model
    with torch.no_grad():
        on_gpu = model(input_ids=IDS.cuda()).logits.cpu()
    assert (on_gpu - _logits(out)).abs().max() <= 1e-3
    assert torch.equal(model.generate(IDS[:, :5].cuda(), max_new_tokens=6).cpu()[:, :5], IDS[:, :5])
