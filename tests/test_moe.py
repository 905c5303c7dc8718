"""MoE checkpoints through every op: experts stored one by one (Qwen3-MoE, DeepSeek-V3, which has a
dense layer first) or fused into 3-D tensors (gpt-oss). Each result is checked against an independent
reference: the merge formulas, full-rank tying reproducing the source, routers left byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint.modules import is_expert, is_router
from surgery.demo_models import demo_model
from surgery.demo_models.zoo import build, tiny_config
from surgery.evaluation.loading import load_for_eval
from surgery.evaluation.models import quiet_transformers
from tests.conftest import write_plan
from tests.test_task_vectors import task_arithmetic_reference, ties_reference

MOE_TYPES = ("qwen3_moe", "gpt_oss", "deepseek_v3")
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3, 11, 250, 42, 8, 90, 31]])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """moe(type) -> (base, fine-tune a, fine-tune b): a tiny MoE with the demo tokenizer, and two
    perturbed copies standing for fine-tunes."""
    root = tmp_path_factory.mktemp("moe")
    tokenizer = demo_model("tiny-llama")
    made = {}

    def make(model_type: str) -> tuple[Path, Path, Path]:
        if model_type not in made:
            config = tiny_config(model_type)
            config.vocab_size = 2048  # the demo tokenizer's
            base = root / model_type
            with quiet_transformers():
                build(config).save_pretrained(base)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tokenizer / name, base / name)
            made[model_type] = (base, _tuned(base, root / f"{model_type}-a", 1), _tuned(base, root / f"{model_type}-b", 2))
        return made[model_type]
    return make


def _tuned(base: Path, out: Path, seed: int) -> Path:
    shutil.copytree(base, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in load_file(base / "model.safetensors").items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _apply(cli, tmp_path: Path, body: str, name: str) -> Path:
    out = tmp_path / name
    result = cli("apply", write_plan(tmp_path, f"output: {out}\n{body}", f"{name}.yaml"))
    assert result.code == 0, result.err
    return out


def _logits(folder: Path) -> torch.Tensor:
    loaded = load_for_eval(folder, device="cpu", dtype="float32")
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_merges_follow_their_formulas_on_every_expert(model_type, moe, cli, tmp_path):
    base, a, b = moe(model_type)
    models = f"      - {{model: {a}, weight: 0.7}}\n      - {{model: {b}, weight: 0.4}}\n"
    ta = _apply(cli, tmp_path, f"base: {base}\nsteps:\n  - op: task_arithmetic\n    models:\n{models}", "ta")
    ties = _apply(cli, tmp_path, f"base: {base}\nsteps:\n  - op: ties\n    density: 0.3\n    models:\n{models}", "ties")
    weights = [load_file(f / "model.safetensors") for f in (base, a, b)]
    got_ta, got_ties = load_file(ta / "model.safetensors"), load_file(ties / "model.safetensors")
    experts = [n for n in weights[0] if ".experts." in n]
    assert experts and set(got_ta) == set(weights[0]) == set(got_ties)
    for name, tensor in weights[0].items():
        tuned = [weights[1][name], weights[2][name]]
        assert torch.equal(got_ta[name], task_arithmetic_reference(tensor, tuned, (0.7, 0.4))), name
        assert torch.equal(got_ties[name], ties_reference(tensor, tuned, (0.7, 0.4), 0.3, 1.0)), name


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_tying_moe_layers_shares_the_experts_and_relaxes_the_rest(model_type, moe, cli, tmp_path):
    """At full rank every relaxed matrix is its depth's own again; the experts are shared, so the result
    equals the source with each depth's experts replaced by its slot's (the same edit in memory)."""
    from transformers import AutoModelForCausalLM

    base, _, _ = moe(model_type)
    compact = _apply(cli, tmp_path, f"model: {base}\nsteps:\n  - op: tie\n    loops: 2\n    init: lower\n"
                     "    relax: {rank: full}\n",
                     "tie")
    loop_map = json.loads((compact / "config.json").read_text())["surgery_recursive"]["loop_map"]
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    layers = reference.model.layers
    per_depth = set(json.loads((compact / "config.json").read_text())["surgery_recursive"]["per_depth"])
    for depth, slot in enumerate(loop_map):  # init lower: slot s holds layer s's experts and router
        for name, _ in list(layers[depth].named_parameters()):
            if (is_expert(name) or is_router(name)) and name not in per_depth:
                module, _, leaf = name.rpartition(".")
                layers[depth].get_submodule(module).register_parameter(leaf, layers[slot].get_parameter(name))
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    assert (_logits(compact) - expected).abs().max() <= 1e-4
    assert cli("check", write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'x'}\nsteps:\n  - op: tie\n"
                                   "    loops: 2\n    relax: {modules: [experts]}\n", "x.yaml")).code == 2


def test_tying_layers_of_two_kinds_is_refused(moe, cli, tmp_path):
    base, _, _ = moe("deepseek_v3")  # layer 0 dense, the rest MoE
    result = cli("apply", write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: tie\n"
                                     "    loops: 2\n"))
    assert result.code == 2 and "only layers of one shape can share weights" in result.err


@pytest.mark.parametrize("model_type", MOE_TYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_bits_quantizes_experts_and_keeps_routers_at_full_precision(model_type, packed, moe, cli, tmp_path):
    base, _, _ = moe(model_type)
    if packed and model_type == "gpt_oss":
        pytest.skip("fused 3-D experts are not packed: test_fused_experts_are_quantized_expert_by_expert")
    fmt = "    format: compressed-tensors\n" if packed else ""
    out = _apply(cli, tmp_path, f"model: {base}\nsteps:\n  - op: bits\n    score: manual\n"
                 "    manual: {0: 4, 1: 4, 2: 4, 3: 4}\n    quantizer: {group_size: 16, symmetric: true}\n" + fmt, "bits")
    source, written = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    routers = [n for n in source if is_router(n.split(".", 3)[-1]) and n.endswith(".weight")]
    assert routers, "the tiny MoE has routers"
    for name in routers:
        assert torch.equal(written[name], source[name]), name  # byte for byte
    matrices = [n for n, t in source.items() if t.dim() == 2 and ".layers." in n and n not in routers
                and not n.endswith("bias")]
    matrices += [n for n, t in source.items() if t.dim() == 3 and is_expert(n)]  # gpt-oss's experts are fused
    assert any(".experts." in n for n in matrices)
    for name in matrices:
        if packed:
            assert name.removesuffix(".weight") + ".weight_packed" in written, name
        else:
            assert not torch.equal(written[name], source[name]), name
    if packed:
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert all(r.removesuffix(".weight") in config["ignore"] for r in routers)


def test_fused_experts_are_quantized_expert_by_expert_along_their_input(moe, cli, tmp_path):
    """gpt-oss stores each projection's experts as one (experts, input, output) tensor: each expert is
    the reference RTN of its (output, input) matrix, with groups along the input; the output loads in
    transformers; the packed format refuses them, and `keep: [experts]` leaves them byte for byte."""
    from surgery.compute.quantize import integer_range

    base, _, _ = moe("gpt_oss")
    step = "steps:\n  - op: bits\n    score: manual\n    manual: {0: 4, 1: 4, 2: 4, 3: 4}\n" \
           "    quantizer: {group_size: 16, symmetric: true}\n"
    out = _apply(cli, tmp_path, f"model: {base}\n{step}", "dense")
    source, written = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    fused = [n for n, t in source.items() if t.dim() == 3 and is_expert(n)]
    assert fused
    def rtn(matrix: torch.Tensor) -> torch.Tensor:  # 4-bit symmetric RTN, groups of 16 along the last axis
        groups = matrix.reshape(matrix.shape[0], -1, 16)
        scale = groups.abs().amax(-1, keepdim=True) / 7.5  # the tiny model is float32: scales too
        low, high = integer_range(4)
        return ((groups / scale).round().clamp(low, high) * scale).reshape(matrix.shape)

    for name in fused:
        for expert, weight in enumerate(source[name].float()):  # (input, output)
            got = written[name][expert].float()
            assert torch.allclose(got, rtn(weight.T).T, rtol=0, atol=1e-6), name
            assert not torch.allclose(got, rtn(weight), rtol=0, atol=1e-6), name  # not along the output axis
    with quiet_transformers():
        from transformers import AutoModelForCausalLM

        _, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    refused = cli("apply", write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'packed'}\n{step}"
                                      "    format: compressed-tensors\n", "packed.yaml"))
    assert refused.code == 2 and "fused in one 3-D tensor" in refused.err and not (tmp_path / "packed").exists()
    kept = _apply(cli, tmp_path, f"model: {base}\n{step}    keep: [embed, lm_head, norms, experts]\n", "kept")
    kept_tensors = load_file(kept / "model.safetensors")
    assert all(torch.equal(kept_tensors[name], source[name]) for name in fused)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_diff_pairs_the_layers_of_a_reordered_moe(model_type, moe, cli, tmp_path):
    base, _, _ = moe(model_type)
    order = [0, 2, 1, 3] if model_type != "deepseek_v3" else [0, 1, 3, 2]
    out = _apply(cli, tmp_path, f"model: {base}\nsteps:\n  - op: chain\n    layers: {order}\n", "chain")
    result = cli("diff", base, out, "--json")
    assert result.code in (0, 1), result.err
    report = json.loads(result.out)
    assert [layer["identical_to"] for layer in report["layers"]] == order


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_analyze_scores_every_moe_layer(model_type, moe, cli):
    base, _, _ = moe(model_type)
    result = cli("analyze", base, "--data", "builtin:mixed-heldout", "--samples", "4", "--seq-len", "32", "--json")
    assert result.code == 0, result.err
    analysis = json.loads(result.out)
    assert len(analysis["layers"]) == 4
    for layer in analysis["layers"]:
        assert all(isinstance(layer[key], float) for key in ("bi", "zd")), layer


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_packed_moe_loads_in_transformers_and_equals_the_dense_simulation(model_type, moe, cli, tmp_path):
    """compressed-tensors experts, stored one by one, load into transformers' fused experts."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    base, _, _ = moe(model_type)
    step = ("steps:\n  - op: bits\n    score: manual\n    manual: {0: 4, 1: 4, 2: 4, 3: 4}\n"
            "    quantizer: {group_size: 16, symmetric: true}\n")
    dense = _apply(cli, tmp_path, f"model: {base}\n{step}", "dense")
    packed = _apply(cli, tmp_path, f"model: {base}\n{step}    format: compressed-tensors\n", "packed")
    with quiet_transformers():
        simulated = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
        loaded, info = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, simulated(input_ids=IDS).logits)
    # transformers unpacks every expert with one width: mixed widths would load wrong, so they are refused
    mixed = step.replace("{0: 4, 1: 4, 2: 4, 3: 4}", "{0: 4, 1: 8, 2: 4, 3: 4}") + "    format: compressed-tensors\n"
    result = cli("apply", write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'mixed'}\n{mixed}", "mixed.yaml"))
    assert result.code == 2 and "one bit width" in result.err and not (tmp_path / "mixed").exists()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_gptq_refuses_experts_it_cannot_calibrate_and_quantizes_the_rest(model_type, moe, cli, tmp_path):
    """transformers runs the experts fused (whatever the checkpoint stores), so no expert is a linear
    layer GPTQ can take a Hessian for: refused naming the fix; with the experts kept, the attention
    layers are GPTQ-quantized and the experts and routers left byte for byte."""
    base, _, _ = moe(model_type)
    step = ("steps:\n  - op: bits\n    width: 4\n    calibration: {data: builtin:mixed-dev, samples: 2, seq_len: 32}\n"
            "    quantizer: {method: gptq, group_size: 16}\n")
    refused = cli("apply", write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'no'}\n{step}"))
    assert refused.code == 2 and "is fused experts; add 'experts' to keep" in refused.err
    assert not (tmp_path / "no").exists()
    out = _apply(cli, tmp_path, f"model: {base}\n{step}    keep: [embed, lm_head, norms, experts]\n", "kept")
    source, written = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    quantized = 0
    for name, tensor in source.items():
        if is_expert(name) or is_router(name.split(".", 3)[-1]) or ".layers." not in name or tensor.dim() == 1:
            assert torch.equal(written[name], tensor), name
        elif "self_attn" in name and name.endswith("proj.weight"):
            assert not torch.equal(written[name], tensor), name
            quantized += 1
    assert quantized >= 4 * 4  # q, k, v and o of every layer


def test_kl_costs_of_experts_stored_one_by_one_are_refused_until_kept(moe, cli, tmp_path):
    """transformers fuses Qwen3-MoE's stored experts into one module, so rounding one stored expert in the
    loaded model is impossible: refused naming the fix; kept, the costs are measured."""
    base, _, _ = moe("qwen3_moe")
    step = ("steps:\n  - op: bits\n    score: kl\n    calibration: {data: builtin:mixed-dev, samples: 2, seq_len: 32}\n"
            "    assign: {high: 8, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 16, symmetric: true}\n")
    refused = cli("apply", write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'no'}\n{step}"))
    assert refused.code == 2 and "score kl rounds layers of transformers' module" in refused.err
    out = _apply(cli, tmp_path, f"model: {base}\n{step}    keep: [embed, lm_head, norms, experts]\n", "kept")
    fit = json.loads((out / "surgery.json").read_text())["fits"][0]
    assert sorted(fit["bits"]) == [4, 4, 8, 8] and all(c > 0 for c in fit["costs"]["4"])
