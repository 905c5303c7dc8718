"""`bits`: measured layer importance, bit assignment, RTN, and the dense and packed formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.compute.quantize import quantize
from surgery.demo_models import demo_model
from surgery.ops.bits import BitAssignment, assign_bits
from tests.conftest import assert_plan_refused, outputs_on_devices, write_plan
from tests.reference import load, outputs

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3, 11, 250, 42, 8, 90, 31]])
CALIBRATION = "calibration: {data: builtin:mixed-dev, samples: 4, seq_len: 128}\n    quantizer: {group_size: 32}"


def _bits(cli, tmp_path: Path, step: str, name: str = "out") -> Path:
    out = tmp_path / name
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {out}\nsteps:\n  - op: bits\n{step}", f"{name}.yaml")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    return out


def _rtn_reference(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The RTN formulas written out element by element (float64), independent of surgery's code."""
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = torch.empty_like(w, dtype=torch.float64)
    steps = torch.empty(w.shape[0], w.shape[1] // group, dtype=torch.float64)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // group):
            x = w[r, g * group:(g + 1) * group].double()
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            scale = max(abs(lo), hi) / ((q_max - q_min) / 2) if symmetric else (hi - lo) / (q_max - q_min)
            zero = 0.0 if symmetric else min(max(round(q_min - lo / scale), q_min), q_max)
            q = torch.clamp(torch.round(x / scale + zero), q_min, q_max)
            out[r, g * group:(g + 1) * group] = (q - zero) * scale
            steps[r, g] = scale
    return out, steps


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_round_trip_has_the_error_of_rtn(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    mine = quantize(w, bits, 32, symmetric, torch.float32).dequantized().double()
    reference, steps = _rtn_reference(w, bits, 32, symmetric)
    per_element = steps.repeat_interleave(32, dim=1)
    # the same formula: equal to float32 precision, but for ties at a rounding boundary (one step apart)
    differs = (mine - reference).abs() > 1e-5
    assert differs.double().mean() < 0.01
    assert torch.allclose((mine - reference).abs()[differs], per_element[differs], rtol=1e-3)
    # round to nearest: no element is off by more than half a step; the error is uniform noise
    error = (mine - w.double()).abs()
    assert bool((error <= per_element / 2 + 1e-6).all())
    mse = float(((mine - w.double()) ** 2).mean())
    assert mse == pytest.approx(float((per_element ** 2).mean()) / 12, rel=0.35)


def test_packing_matches_the_compressed_tensors_package():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from surgery.compute.quantize import pack

    for bits in (2, 4, 8):
        values = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (8, 64), dtype=torch.int8)
        packed = pack(values, bits)
        assert torch.equal(packed, helpers.pack_to_int32(values, bits))
        assert torch.equal(helpers.unpack_from_int32(packed, bits, values.shape), values)


def test_lim_and_zd_scores_equal_direct_computations(cli, tmp_path):
    out = _bits(cli, tmp_path, f"    score: lim\n    {CALIBRATION}\n    assign: {{high: 8, low: 4, low_fraction: 0.5}}\n")
    fits = json.loads((out / "surgery.json").read_text())["fits"][0]
    model = load(demo_model("base"))
    from transformers import AutoTokenizer

    from surgery.evaluation.data import load_text

    ids = AutoTokenizer.from_pretrained(demo_model("base"))(load_text("builtin:mixed-dev").text)["input_ids"][:512]
    cos = torch.zeros(8, dtype=torch.float64)
    with torch.no_grad():
        for row in torch.tensor(ids).reshape(4, 128):
            hidden = model(input_ids=row[None], output_hidden_states=True).hidden_states
            for i in range(7):  # the last entry has the final norm applied: layers 0-6 are checked
                cos[i] += torch.nn.functional.cosine_similarity(hidden[i][0], hidden[i + 1][0], dim=-1).double().sum()
    assert fits["scores"][:7] == pytest.approx((-cos[:7] / 512).tolist(), abs=1e-5)
    order = sorted(range(8), key=lambda i: fits["scores"][i])
    assert [i for i, b in enumerate(fits["bits"]) if b == 4] == sorted(order[:4])
    assert fits["average_bits"] == 6.0

    zd = _bits(cli, tmp_path, "    score: zd\n    assign: {high: 8, low: 3, low_fraction: 0.25}\n"
               "    quantizer: {group_size: 32}\n", "zd")
    scores = json.loads((zd / "surgery.json").read_text())["fits"][0]["scores"]
    weights = load_file(demo_model("base") / "model.safetensors")
    for layer in (0, 5):
        fractions = []
        for name, w in weights.items():
            if name.startswith(f"model.layers.{layer}.") and w.ndim == 2:
                z = (w.double() - w.double().mean()) / w.double().std()
                fractions.append(float((z.abs() > 1).double().mean()))
        assert scores[layer] == pytest.approx(sum(fractions) / len(fractions), abs=1e-12)


def test_assignment_rules():
    scores = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]  # least important: 1, 5, 3, 7, 0, ...
    pair = BitAssignment(high=8, low=4, low_fraction=0.5)
    assert assign_bits(pair, scores, 8, {}) == [8, 4, 8, 4, 8, 4, 8, 4]
    assert assign_bits(pair, scores, 8, {1: 16}) == [8, 16, 8, 4, 8, 4, 8, 4]
    target = BitAssignment(target_bits=4.5, choices=[2, 4, 8])
    widths = assign_bits(target, scores, 8, {})
    assert sum(widths) / 8 <= 4.5 and widths[1] == 2 and widths[2] == 8  # least important lowered first
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="target_bits 1.5 is below the smallest choice 2"):
        assign_bits(BitAssignment(target_bits=1.5, choices=[2, 4]), scores, 8, {})


def test_packed_output_loads_through_transformers_and_equals_the_dense_simulation(cli, tmp_path):
    pytest.importorskip("compressed_tensors")
    step = ("    score: lim\n    calibration: {data: builtin:mixed-dev, samples: 4, seq_len: 128}\n"
            "    assign: {high: 8, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 32, symmetric: true}\n")
    dense = _bits(cli, tmp_path, step, "dense")
    packed = _bits(cli, tmp_path, step + "    format: compressed-tensors\n", "packed")
    assert (outputs(load(packed), IDS) - outputs(load(dense), IDS)).abs().max() <= 1e-6
    widths = json.loads((packed / "surgery.json").read_text())["fits"][0]["bits"]
    stored, source = load_file(packed / "model.safetensors"), load_file(demo_model("base") / "model.safetensors")
    for layer, width in enumerate(widths):
        for module in ("self_attn.q_proj", "mlp.down_proj"):
            w = source[f"model.layers.{layer}.{module}.weight"]
            words = stored[f"model.layers.{layer}.{module}.weight_packed"]
            assert words.numel() * 32 == w.numel() * width  # exactly `width` bits per weight
            assert stored[f"model.layers.{layer}.{module}.weight_scale"].shape == (w.shape[0], w.shape[1] // 32)
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {4, 8}
    assert cli("eval", packed, "--max-tokens", "256", "--device", "cpu").code == 0
    # the demo's rows are 96 weights (256 for down_proj): a k-quant's 256-weight block fits down_proj only
    lines = (packed / "llama-tensor-types.txt").read_text().splitlines()
    want = []
    for layer, w in enumerate(widths):
        kinds = {"q8_0": "attn_k|attn_output|attn_q|attn_v|ffn_down|ffn_gate|ffn_up"} if w == 8 else \
            {"q4_0": "attn_k|attn_output|attn_q|attn_v|ffn_gate|ffn_up", "q4_k": "ffn_down"}
        want += [f"blk\\.{layer}\\.({names})\\.weight={kind}" for kind, names in sorted(kinds.items())]
    assert lines == want


@pytest.mark.parametrize("step, message", [
    ("    score: manual\n    manual: {0: 3}\n    quantizer: {group_size: 32}\n", "layer 1 has no width"),
    ("    score: manual\n    manual: {0: 3, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4, 6: 4, 7: 4}\n    format: compressed-tensors\n"
     "    quantizer: {symmetric: true, group_size: 32}\n", "layer 0 gets 3 bits but format compressed-tensors supports 2, 4, 8"),
    ("    score: zd\n    assign: {high: 8, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 96}\n",
     "group_size 96 does not divide the input dimension 256 of mlp.down_proj.weight; use a divisor of 32, which "
     "divides every quantized matrix's input dimension"),
    ("    score: zd\n    assign: {target_bits: 1, choices: [2, 4]}\n    quantizer: {group_size: 32}\n",
     "target_bits 1 is below the smallest choice 2"),
    ("    score: zd\n    assign: {high: 8, low: 4, low_fraction: 0.5}\n    format: compressed-tensors\n",
     "needs quantizer.symmetric: true"),
    ("    score: lim\n", "add one, e.g. {high: 8, low: 4, low_fraction: 0.5}"),
    ("    width: 4\n    quantizer: {act_order: true, group_size: 32}\n", "act_order is a GPTQ setting; add method: gptq"),
    ("    width: 4\n    score: zd\n", "width gives every layer one width; leave out score and assign"),
    ("    score: zd\n    assign: {high: 8, low: 4, low_fraction: 0.5}\n    format: compressed-tensors\n"
     "    quantizer: {symmetric: true, group_size: 32}\n  - op: chain\n    layers: [0-3]\n",
     "bits with format: compressed-tensors must be the last step"),
])
def test_bad_bits_plans(step, message, cli, tmp_path):
    plan = f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: bits\n{step}"
    assert_plan_refused(cli, tmp_path, plan, message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bits_on_cuda_equals_cpu(cli, tmp_path):
    step = "    score: manual\n    manual: {0: 2, 1: 3, 2: 4, 3: 8, 4: 4, 5: 4, 6: 4, 7: 4}\n    quantizer: {group_size: 32}\n"
    outs = outputs_on_devices(cli, tmp_path, f"model: {demo_model('base')}\nsteps:\n  - op: bits\n{step}")
    for name, tensor in outs["cpu"].items():
        # the same integers; a scale may differ in its last bit (torch's CPU divides by a constant
        # through its reciprocal, CUDA divides exactly)
        torch.testing.assert_close(outs["cuda"][name], tensor, rtol=1e-6, atol=1e-7)


def test_cheapest_widths_is_the_least_cost_assignment_within_the_target():
    import itertools
    import random

    from surgery.ops.bits import cheapest_widths

    rng = random.Random(0)
    choices = [2, 3, 4, 8]
    for trial in range(20):
        costs = {w: [rng.random() / w for _ in range(6)] for w in choices}
        target = rng.choice([2.5, 3, 3.5, 4.25, 6])
        manual = {rng.randrange(6): rng.choice(choices)} if trial % 3 == 0 else {}
        feasible = [c for c in itertools.product(choices, repeat=6) if sum(c) <= target * 6
                    and all(c[layer] == w for layer, w in manual.items())]
        if not feasible:
            continue
        widths = cheapest_widths(costs, target, manual)
        best = min(sum(costs[w][i] for i, w in enumerate(c) if i not in manual) for c in feasible)
        assert sum(widths) <= target * 6 and all(widths[layer] == w for layer, w in manual.items())
        assert sum(costs[w][i] for i, w in enumerate(widths) if i not in manual) == pytest.approx(best, abs=1e-12)
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="target_bits 2 is below what the choices"):
        cheapest_widths({2: [0.1] * 4, 4: [0.0] * 4}, 2, {0: 4})


def test_kl_costs_equal_a_direct_computation(cli, tmp_path):
    """score: kl records, per width and layer, the KL from the model as stored when only that layer is
    rounded (RTN); recomputed here with transformers, the RTN formula and torch's kl_div; the assignment
    is the cheapest within the target."""
    from transformers import AutoTokenizer

    from surgery.evaluation.data import load_text
    from surgery.ops.bits import cheapest_widths

    step = ("    score: kl\n    calibration: {data: builtin:mixed-dev, samples: 4, seq_len: 128}\n"
            "    assign: {target_bits: 3, choices: [2, 4]}\n    quantizer: {group_size: 32}\n")
    out = _bits(cli, tmp_path, step)
    fit = json.loads((out / "surgery.json").read_text())["fits"][0]
    costs = {int(w): c for w, c in fit["costs"].items()}
    assert fit["bits"] == cheapest_widths(costs, 3, {}) and sum(fit["bits"]) <= 24
    model = load(demo_model("base"))
    ids = AutoTokenizer.from_pretrained(demo_model("base"))(load_text("builtin:mixed-dev").text)["input_ids"][:512]
    rows = torch.tensor(ids).reshape(4, 128)
    with torch.no_grad():
        reference = torch.cat([model(input_ids=r[None]).logits[0] for r in rows]).double().log_softmax(-1)
        for layer, width in ((0, 2), (5, 4)):
            prefix = f"model.layers.{layer}."
            for name, p in model.named_parameters():
                if name.startswith(prefix) and p.dim() == 2:
                    p.copy_(quantize(p.detach().clone(), width, 32, False, torch.float32).dequantized())
            probe = torch.cat([model(input_ids=r[None]).logits[0] for r in rows]).double().log_softmax(-1)
            kl = torch.nn.functional.kl_div(probe, reference, log_target=True, reduction="batchmean")
            assert costs[width][layer] == pytest.approx(float(kl), rel=1e-4)
            model = load(demo_model("base"))


def test_check_says_which_runtimes_cannot_load_the_packed_widths(cli, tmp_path):
    """2-bit layers load in transformers (equal to the dense simulation) but in no vLLM; 8-bit groups
    not in vLLM's CPU build: `check` says so before anything is written, `apply` again."""
    pytest.importorskip("compressed_tensors")
    step = ("    score: manual\n    manual: {0: 2, 1: 8, 2: 4, 3: 4, 4: 4, 5: 4, 6: 4, 7: 4}\n"
            "    quantizer: {group_size: 32, symmetric: true}\n")
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'packed'}\nsteps:\n  - op: bits\n"
                      f"{step}    format: compressed-tensors\n", "packed.yaml")
    checked = cli("check", plan)
    assert checked.code == 0 and not (tmp_path / "packed").exists()
    warnings = [line for line in checked.err.splitlines() if "warning" in line]
    assert any("layers of 2 bits do not load in vLLM (GPU)" in line for line in warnings), checked.err
    assert any("layers of 2 and 8 bits do not load in vLLM (CPU build)" in line for line in warnings), checked.err
    assert not any("transformers" in line for line in warnings)
    packed = _bits(cli, tmp_path, step + "    format: compressed-tensors\n", "packed")
    dense = _bits(cli, tmp_path, step, "dense")
    assert (outputs(load(packed), IDS) - outputs(load(dense), IDS)).abs().max() <= 1e-6
