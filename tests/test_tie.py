"""`tie`: recursive and relaxed recursive models, compact and materialized, against in-memory references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.demo_models import demo_model
from surgery.evaluation.loading import load_for_eval
from surgery.ops.tie import TieStep, init_sources, slot_groups
from tests.conftest import assert_plan_refused, outputs_on_devices, write_plan
from tests.reference import load, outputs, tie_in_memory

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3, 11, 250, 42, 8, 90, 31]])


def _tie(cli, tmp_path: Path, model: Path, step: str, name: str = "out") -> Path:
    out = tmp_path / name
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\nsteps:\n  - op: tie\n{step}", f"{name}.yaml")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    return out


def _logits(folder: Path) -> torch.Tensor:
    return outputs(load_for_eval(folder, device="cpu", dtype="float32").model, IDS)


def test_slot_maps_and_init_sources():
    assert slot_groups(TieStep(op="tie", loops=2), 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert slot_groups(TieStep(op="tie", loops=2, strategy="sequence"), 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert slot_groups(TieStep(op="tie", block=[[0, 2], "1", [3]]), 4) == [[0, 2], [1], [3]]
    groups = slot_groups(TieStep(op="tie", loops=2), 8)
    assert init_sources("average", groups, 8) == groups
    assert init_sources("lower", groups, 8) == [[0], [1], [2], [3]]
    assert init_sources("stepwise", groups, 8) == [[0], [2], [5], [7]]  # round(linspace(0, 7, 4)), ends included


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma2", "phi3", "gpt_neox"])
def test_full_rank_relaxation_reproduces_the_original(arch, tiny, cli, tmp_path):
    """At full rank, shared + B A is each depth's own weight again: same logits as the source (float32)."""
    source = tiny(arch)
    compact = _tie(cli, tmp_path, source, "    loops: 2\n    relax: {rank: full}\n")
    original = outputs(load(source), IDS)
    assert (_logits(compact) - original).abs().max() <= 1e-4
    materialized = tmp_path / "materialized"
    assert cli("materialize", compact, materialized).code == 0
    assert (outputs(load(materialized), IDS) - original).abs().max() <= 1e-4


def test_demo_model_full_rank_and_both_forms_agree(cli, tmp_path):
    base = demo_model("base")
    compact = _tie(cli, tmp_path, base, "    loops: 2\n    relax: {rank: full}\n")
    original = outputs(load(base), IDS)
    compact_logits = _logits(compact)
    assert (compact_logits - original).abs().max() <= 1e-4
    step = "    loops: 2\n    strategy: sequence\n    init: stepwise\n    relax: {rank: 8, modules: [q_proj, down_proj]}\n"
    compact = _tie(cli, tmp_path, base, step, "compact")
    planned = _tie(cli, tmp_path, base, step + "    format: materialized\n", "planned")
    converted = tmp_path / "converted"
    assert cli("materialize", compact, converted).code == 0
    # the plan's materialized form and the converted compact form are the same tensors
    planned_tensors, converted_tensors = load_file(planned / "model.safetensors"), load_file(converted / "model.safetensors")
    assert planned_tensors.keys() == converted_tensors.keys()
    for name, tensor in planned_tensors.items():
        torch.testing.assert_close(converted_tensors[name], tensor, rtol=0, atol=1e-6)
    reference = outputs(load(planned), IDS)
    assert (_logits(compact) - reference).abs().max() <= 1e-5
    assert (outputs(load(converted), IDS) - reference).abs().max() <= 1e-5


def test_strict_recursion_equals_in_memory_tying(cli, tmp_path):
    base = demo_model("base")
    compact = _tie(cli, tmp_path, base, "    loops: 2\n")
    groups = [[0, 4], [1, 5], [2, 6], [3, 7]]
    reference = tie_in_memory(load(base), groups, [0, 1, 2, 3, 0, 1, 2, 3])
    loaded = load_for_eval(compact, device="cpu", dtype="float32")
    assert (outputs(loaded.model, IDS) - outputs(reference, IDS)).abs().max() <= 1e-5
    # parameters are really shared: depths 0 and 4 hold the very same tensors
    layers = loaded.model.model.layers
    assert layers[0].self_attn.q_proj.weight is layers[4].self_attn.q_proj.weight
    assert layers[0].input_layernorm.weight is layers[4].input_layernorm.weight
    assert layers[0].self_attn.layer_idx == 0 and layers[4].self_attn.layer_idx == 4  # own KV-cache slots
    original = load(base)
    per_layer = sum(p.numel() for p in original.model.layers[0].parameters())
    assert loaded.parameters == sum(p.numel() for p in original.parameters()) - 4 * per_layer
    # generation with a KV cache: each depth writes its own slot, so greedy tokens match the reference
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.model.generate(IDS[:, :6], **settings), reference.generate(IDS[:, :6], **settings))


def test_lora_factors_are_the_truncated_svd_of_the_residual(cli, tmp_path):
    """Independent check (float64): B A is the best rank-r approximation of W_l - mean(tied layers)."""
    base = demo_model("base")
    compact = _tie(cli, tmp_path, base, "    loops: 4\n    relax: {rank: 8}\n")
    source, stored = load_file(base / "model.safetensors"), load_file(compact / "model.safetensors")
    config = json.loads((compact / "config.json").read_text())["surgery_recursive"]
    assert config["loop_map"] == [0, 1, 0, 1, 0, 1, 0, 1]
    for depth, name in [(3, "self_attn.q_proj"), (6, "mlp.down_proj")]:
        tied = range(depth % 2, 8, 2)  # cycle: slot s holds layers s, s + K, ...
        shared = torch.stack([source[f"model.layers.{i}.{name}.weight"].double() for i in tied]).mean(0)
        assert torch.allclose(stored[f"model.layers.{depth % 2}.{name}.weight"].double(), shared, atol=1e-6)
        residual = source[f"model.layers.{depth}.{name}.weight"].double() - shared
        b, a = stored[f"depths.{depth}.{name}.lora_B.weight"].double(), stored[f"depths.{depth}.{name}.lora_A.weight"].double()
        assert b.shape[1] == a.shape[0] == 8
        singular = torch.linalg.svdvals(residual)
        best = singular[8:].square().sum().sqrt()  # Eckart-Young: the error of the best rank-8 approximation
        assert float((residual - b @ a).norm()) == pytest.approx(float(best), rel=1e-4)


def test_perplexity_improves_with_rank_and_compact_size(cli, tmp_path):
    from surgery.evaluation.run import EvalSettings, evaluate

    base = demo_model("base")
    settings = EvalSettings(data=("builtin:mixed-dev",), max_tokens=2048, device="cpu", dtype="float32")
    scores = {}
    for rank in (None, 4, 16, 64):
        relax = "" if rank is None else f"    relax: {{rank: {rank}}}\n"
        out = _tie(cli, tmp_path, base, "    loops: 2\n" + relax, f"r{rank}")
        scores[rank] = evaluate(out, settings).perplexity
        if rank == 4:  # K/L of the layers' bytes, plus the factors and per-depth vectors
            source, stored = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
            nbytes = lambda tensors, pick: sum(t.numel() * t.element_size() for n, t in tensors.items() if pick(n))  # noqa: E731
            layer_bytes = nbytes(source, lambda n: n.startswith("model.layers."))
            vector_bytes = nbytes(source, lambda n: n.startswith("model.layers.") and n.endswith("norm.weight"))
            lora_bytes = nbytes(stored, lambda n: ".lora_" in n)
            outside = nbytes(source, lambda n: not n.startswith("model.layers."))
            expected = outside + (layer_bytes - vector_bytes) / 2 + vector_bytes + lora_bytes
            assert nbytes(stored, lambda n: True) == expected
            assert (out / "model.safetensors").stat().st_size == pytest.approx(expected, rel=0.01)
    # Rank 16 already recovers most of the untied model's perplexity here (docs/recursive.md), so above
    # it the differences shrink toward one CPU's rounding against another's: only "no worse beyond 1%"
    # is asserted there.
    assert scores[None] > scores[4] > scores[16]
    assert scores[64] < scores[16] * 1.01


@pytest.mark.parametrize("step, message", [
    ("    loops: 3\n", "8 layers do not split into 3 loops; use loops that divide 8 (1, 2, 4, 8)"),
    ("    loops: 2\n    relax: {rank: 0}\n", "rank 0 is below 1"),
    ("    loops: 2\n    relax: {modules: [q_proj, c_attn]}\n", "relax module 'c_attn' matches no matrix of the layers"),
    ("    block: [[0, 1], [2, 3]]\n", "layer 4 is in no slot"),
    ("    block: [[0, 1, 2, 3], [3, 4, 5, 6, 7]]\n", "layer 3 is in two slots"),
    ("    loops: 2\n    block: [[0, 1]]\n", "give either 'loops'"),
    ("    loops: 2\n  - op: chain\n    layers: [0-3]\n", "tie with format: compact must be the last step"),
])
def test_bad_tie_plans(step, message, cli, tmp_path):
    plan = f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: tie\n{step}"
    assert_plan_refused(cli, tmp_path, plan, message)


def test_compact_is_refused_by_plain_transformers_and_read_by_surgery(cli, tmp_path):
    compact = _tie(cli, tmp_path, demo_model("base"), "    loops: 2\n    relax: {rank: 4}\n")
    with pytest.raises(Exception, match="surgery_recursive"):
        load(compact)
    result = cli("eval", compact, "--max-tokens", "256", "--device", "cpu")
    assert result.code == 0, result.err
    assert cli("materialize", tmp_path / "missing", tmp_path / "m").code == 2
    assert cli("materialize", demo_model("base"), tmp_path / "m").code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tie_on_cuda_equals_cpu(cli, tmp_path):
    """SVDs on the GPU may flip signs of singular vectors, so B A (not B and A) is compared."""
    base = demo_model("base")
    step = "    loops: 2\n    relax: {rank: 8}\n    format: materialized\n"
    outs = outputs_on_devices(cli, tmp_path, f"model: {base}\nsteps:\n  - op: tie\n{step}")
    for name, tensor in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][name], tensor, rtol=1e-3, atol=1e-4)
    compact = _tie(cli, tmp_path, base, "    loops: 2\n    relax: {rank: 8}\n", "compact")
    on_gpu = load_for_eval(compact, device="cuda", dtype="float32").model
    with torch.no_grad():
        gpu_logits = on_gpu(input_ids=IDS.cuda(), use_cache=False).logits.cpu()
    assert (gpu_logits - _logits(compact)).abs().max() <= 1e-3
