"""`rotate`: the rotated model computes what the original did, its matrices are the original's with one
orthogonal Q recovered from the outputs themselves, and models it cannot rotate exactly are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from surgery.demo_models import demo_model
from tests.conftest import assert_plan_refused, write_plan
from tests.reference import load

IDS = torch.randint(0, 2048, (1, 48), generator=torch.Generator().manual_seed(0))


def _rotate(cli, tmp_path, model) -> object:
    out = tmp_path / "rotated"
    result = cli("apply", write_plan(tmp_path, f"model: {model}\noutput: {out}\nsteps:\n  - op: rotate\n    seed: 3\n"))
    assert result.code == 0, result.err
    return out


@pytest.mark.parametrize("name", ["base", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"])
def test_the_rotated_model_computes_what_the_original_did(name, cli, tmp_path):
    """Qwen2's projection biases and Qwen3's per-head q/k norms stay as they are; logits agree to float32."""
    original = demo_model(name)
    out = _rotate(cli, tmp_path, original)
    with torch.no_grad():
        before, after = load(original)(input_ids=IDS).logits, load(out)(input_ids=IDS).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def test_the_rotation_is_one_orthogonal_matrix_folded_as_the_residual_stream_says(cli, tmp_path):
    """Q recovered from the embedding alone (E' = E Q, least squares) is orthogonal, and every reader is
    W diag(norm) Q, every writer Q^T W, the head W diag(final norm) Q, every norm ones."""
    source = load_file(demo_model("base") / "model.safetensors")
    out = _rotate(cli, tmp_path, demo_model("base"))
    rotated = load_file(out / "model.safetensors")
    e, e_rotated = source["model.embed_tokens.weight"].double(), rotated["model.embed_tokens.weight"].double()
    q = torch.linalg.lstsq(e, e_rotated).solution
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
    close = lambda a, b: torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)  # noqa: E731
    for layer in range(8):
        p = f"model.layers.{layer}."
        for name, norm in (("self_attn.q_proj", "input_layernorm"), ("self_attn.v_proj", "input_layernorm"),
                           ("mlp.up_proj", "post_attention_layernorm")):
            close(rotated[p + name + ".weight"], source[p + name + ".weight"].double() * source[p + norm + ".weight"].double() @ q)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            close(rotated[p + name + ".weight"], q.T @ source[p + name + ".weight"].double())
        assert torch.equal(rotated[p + "input_layernorm.weight"], torch.ones(96))
    close(rotated["lm_head.weight"], source["lm_head.weight"].double() * source["model.norm.weight"].double() @ q)
    fit = json.loads((out / "surgery.json").read_text())["fits"][0]
    assert fit == {"op": "rotate", "rotation": "random orthogonal", "size": 96, "seed": 3, "step": 0}


def test_rotate_then_gptq_with_token_importance_is_rsq(cli, tmp_path):
    """RSQ as two plans: the rotated checkpoint, then GPTQ weighing tokens by attention; the result loads
    and each layer moves less than RTN's."""
    rotated = _rotate(cli, tmp_path, demo_model("base"))
    out = tmp_path / "rsq"
    plan = (f"model: {rotated}\noutput: {out}\nsteps:\n  - op: bits\n    width: 3\n"
            "    calibration: {data: builtin:mixed-dev, samples: 4, seq_len: 128}\n"
            "    quantizer: {method: gptq, group_size: 32, token_importance: attention}\n")
    result = cli("apply", write_plan(tmp_path, plan, "rsq.yaml"))
    assert result.code == 0, result.err
    fit = json.loads((out / "surgery.json").read_text())["fits"][0]["gptq"]
    assert all(g < r for g, r in zip(fit["output_error"]["gptq"], fit["output_error"]["rtn"]))
    with torch.no_grad():
        assert torch.isfinite(load(out)(input_ids=IDS).logits).all()


@pytest.mark.parametrize("model, message", [
    ("tiny-gemma2", "model type 'gemma2' is not one whose norms and residual stream surgery knows"),
    ("tiny-gpt2", "model type 'gpt2' is not one"),
])
def test_models_it_cannot_rotate_exactly_are_refused(model, message, cli, tmp_path):
    assert_plan_refused(cli, tmp_path, f"model: {demo_model(model)}\noutput: {tmp_path / 'out'}\nsteps:\n"
                        "  - op: rotate\n", message)


def test_tied_embeddings_are_refused(cli, tmp_path):
    import shutil

    folder = tmp_path / "tied"
    shutil.copytree(demo_model("tiny-llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    plans = tmp_path / "plans"
    plans.mkdir()
    assert_plan_refused(cli, plans, f"model: {folder}\noutput: {plans / 'out'}\nsteps:\n  - op: rotate\n",
                        "the embeddings are tied to the head")


def test_a_seed_out_of_range_is_refused(cli, tmp_path):
    assert_plan_refused(cli, tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n"
                        "  - op: rotate\n    seed: 99999999999999999999\n", "seed")
