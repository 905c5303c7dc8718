"""GPTQ: the blocked Cholesky updates equal the paper's column-by-column procedure written out with
explicit inverses (float64), and on the demo models GPTQ moves each layer's output less than RTN."""

from __future__ import annotations

import pytest
import torch

from surgery.compute.gptq import GptqSettings, Hessian, gptq, output_error
from surgery.compute.quantize import quantize


def _reference(w: torch.Tensor, h: torch.Tensor, bits: int, s: GptqSettings) -> torch.Tensor:
    """Optimal Brain Quantization in GPTQ's fixed order, one column at a time: round column q on RTN's
    grid, then move the columns F not yet rounded by -(w_q - quant(w_q)) / [H_F^-1]_qq * [H_F^-1]_q,:
    with H_F^-1 inverted afresh from H restricted to F (no Cholesky factor, no blocks)."""
    w, h = w.double().clone(), h.double().clone()
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rtn = quantize(w, bits, s.group_size, s.symmetric, torch.float64)
    scale, zero = rtn.scale.double(), rtn.zero.double()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += s.dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    order = sorted(range(w.shape[1]), key=lambda c: (-float(h[c, c]), c)) if s.act_order else list(range(w.shape[1]))
    values = torch.zeros_like(w)
    for step, column in enumerate(order):
        remaining = order[step:]
        inverse = torch.linalg.inv(h[remaining][:, remaining])
        g = column // s.group_size
        for r in range(w.shape[0]):
            values[r, column] = min(max(round(float(w[r, column] / scale[r, g] + zero[r, g])), q_min), q_max)
        error = w[:, column] - (values[:, column] - zero[:, g]) * scale[:, g]
        w[:, remaining] -= error[:, None] * inverse[0][None, :] / inverse[0, 0]
    return values


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (8, True)])
def test_gptq_equals_the_column_by_column_procedure(bits, symmetric, act_order):
    torch.manual_seed(bits)
    inputs = torch.randn(200, 48, dtype=torch.float64) * torch.linspace(0.2, 3, 48, dtype=torch.float64)
    inputs[:, 5] = 0  # a dead input
    h = 2 * inputs.T @ inputs / inputs.shape[0]
    w = torch.randn(12, 48, dtype=torch.float64)
    settings = GptqSettings(16, symmetric, act_order=act_order, block_size=20)  # blocks cut groups
    mine = gptq(w, h, bits, settings, torch.float64)
    assert torch.equal(mine.values.double(), _reference(w, h, bits, settings))
    assert bool((mine.values[:, 5] == mine.zero[:, 0]).all())  # a dead input's weights become 0 exactly
    rtn = quantize(w, bits, 16, symmetric, torch.float64)
    assert torch.equal(mine.scale, rtn.scale) and torch.equal(mine.zero, rtn.zero)  # RTN's grid
    assert output_error(w, mine.dequantized(), h) < output_error(w, rtn.dequantized(), h)


def test_hessian_is_the_mean_of_2_x_xT_however_the_rows_arrive():
    torch.manual_seed(0)
    rows = torch.randn(3, 10, 8)
    h = Hessian(8, "cpu")
    for batch in rows:
        h.add(batch)
    flat = rows.reshape(-1, 8).double()
    torch.testing.assert_close(h.matrix.double(), 2 * flat.T @ flat / 30, rtol=1e-5, atol=1e-6)
    assert h.rows == 30


def test_a_singular_hessian_without_dampening_is_refused():
    from surgery.errors import SurgeryError

    torch.manual_seed(0)
    inputs = torch.randn(4, 16, dtype=torch.float64)  # rank 4 < 16 columns
    with pytest.raises(SurgeryError, match="raise quantizer.dampening"):
        gptq(torch.randn(3, 16, dtype=torch.float64), 2 * inputs.T @ inputs, 4, GptqSettings(16, False, dampening=0),
             torch.float64)


CALIBRATION = "    calibration: {data: builtin:mixed-dev, samples: 4, seq_len: 128}\n"


def _bits(cli, tmp_path, body: str, name: str):
    from surgery.demo_models import demo_model
    from tests.conftest import write_plan

    out = tmp_path / name
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {out}\nsteps:\n  - op: bits\n{body}",
                      f"{name}.yaml")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    return out


def _layer_inputs(model, rows) -> dict[str, torch.Tensor]:
    """Every linear layer's inputs in the original model, by weight name (forward pre-hooks)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda _, args, n=name: seen.setdefault(n, []).append(args[0][0]))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        for row in rows:
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    return {f"{name}.weight": torch.cat(xs).double() for name, xs in seen.items()}


@pytest.mark.parametrize("width", [2, 3, 4, 8])
def test_gptq_moves_each_layers_output_less_than_rtn_on_the_demo_model(width, cli, tmp_path):
    """Measured independently of surgery's own figures: ||(W - Q) X|| on the original model's inputs to
    every linear layer, summed per layer, GPTQ's output against RTN's on the same grid."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from surgery.demo_models import demo_model
    from surgery.evaluation.data import load_text
    from tests.reference import load

    body = f"    width: {width}\n{CALIBRATION}    quantizer: {{method: {{}}, group_size: 32}}\n"
    gptq_out = _bits(cli, tmp_path, body.replace("{}", "gptq"), "gptq")
    rtn_out = _bits(cli, tmp_path, body.replace("{}", "rtn"), "rtn")
    ids = AutoTokenizer.from_pretrained(demo_model("base"))(load_text("builtin:mixed-heldout").text)["input_ids"]
    inputs = _layer_inputs(load(demo_model("base")), torch.tensor(ids[:1024]).reshape(8, 128))
    source = load_file(demo_model("base") / "model.safetensors")
    written = {"gptq": load_file(gptq_out / "model.safetensors"), "rtn": load_file(rtn_out / "model.safetensors")}
    for layer in range(8):
        error = {kind: sum(float(((tensors[n].double() - source[n].double()) @ x.T).square().sum())
                           for n, x in inputs.items() if n.startswith(f"model.layers.{layer}."))
                 for kind, tensors in written.items()}
        assert error["gptq"] < 0.9 * error["rtn"], (layer, error)


def test_packed_gptq_loads_through_transformers_and_equals_its_dense_output(cli, tmp_path):
    pytest.importorskip("compressed_tensors")
    from tests.reference import load, outputs

    body = (f"    width: 4\n    manual: {{0: 8}}\n{CALIBRATION}"
            "    quantizer: {method: gptq, group_size: 32, symmetric: true, act_order: true}\n")
    dense = _bits(cli, tmp_path, body, "dense")
    packed = _bits(cli, tmp_path, body + "    format: compressed-tensors\n", "packed")
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3, 11, 250, 42, 8, 90, 31]])
    assert (outputs(load(packed), ids) - outputs(load(dense), ids)).abs().max() <= 1e-6
    config = __import__("json").loads((packed / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {4, 8}


def test_a_stopped_calibration_resumes_at_the_first_layer_not_written(cli, tmp_path, monkeypatch):
    """The integers of each layer are kept as soon as it is done: removing the last layers' files (a run
    stopped there) or damaging one refits only those, and the output is byte for byte the same."""
    monkeypatch.setattr("surgery.ops.gptq_layers.fit_folder", lambda kind, key: tmp_path / "fit")
    body = f"    width: 3\n{CALIBRATION}    quantizer: {{method: gptq, group_size: 32}}\n"
    first = _bits(cli, tmp_path, body, "first")
    files = [tmp_path / "fit" / f"layer-{i}.safetensors" for i in range(8)]
    assert all(path.is_file() for path in files)
    for path in files[5:]:
        path.unlink()
    files[2].write_bytes(b"not a safetensors file")
    again = cli("apply", tmp_path / "first.yaml", "--out", tmp_path / "again")
    assert again.code == 0, again.err
    refitted = [line for line in again.err.splitlines() if line.startswith("gptq: layer ")]
    assert [line.split()[2] for line in refitted] == ["2", "5", "6", "7"]
    assert (first / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    reused = cli("apply", tmp_path / "first.yaml", "--out", tmp_path / "third")
    assert "reusing its integers" in reused.err and "gptq: layer" not in reused.err


def test_too_few_calibration_tokens_without_dampening_is_refused_naming_the_tensor(cli, tmp_path):
    """Known only once the Hessian is measured: after the progress lines, one line naming the layer, the
    tensor and the fix; exit 2; nothing written."""
    from surgery.demo_models import demo_model
    from tests.conftest import write_plan

    body = ("    width: 4\n    quantizer: {method: gptq, group_size: 32, dampening: 0}\n"
            "    calibration: {data: builtin:mixed-dev, samples: 1, seq_len: 8}\n")
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: bits\n{body}")
    result = cli("apply", plan)
    last = result.err.strip().splitlines()[-1]
    assert result.code == 2 and "bits: layer 0 mlp.down_proj.weight: gptq:" in last and "raise quantizer.dampening" in last
    assert "Traceback" not in result.err and not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gptq_on_cuda_agrees_with_cpu(cli, tmp_path):
    from surgery.demo_models import demo_model
    from tests.conftest import outputs_on_devices

    body = f"    width: 4\n{CALIBRATION}    quantizer: {{method: gptq, group_size: 32}}\n"
    outs = outputs_on_devices(cli, tmp_path, f"model: {demo_model('base')}\nsteps:\n  - op: bits\n{body}")
    for name, tensor in outs["cpu"].items():
        # float32 on two devices: a weight near a rounding boundary may land one grid step apart
        close = torch.isclose(outs["cuda"][name], tensor, rtol=1e-5, atol=1e-6)
        assert close.double().mean() > 0.99, name


ARCHITECTURES = ("qwen3", "gemma2", "gemma3n_text", "phi3", "gpt_neox", "zamba2")


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_gptq_runs_layer_by_layer_on_other_architectures(model_type, cli, tmp_path):
    """Sliding-window and global layers (Gemma 2), per-layer token inputs (Gemma 3n), fused QKV (Phi-3,
    GPT-NeoX), a hybrid with Mamba layers (Zamba2): the replay of one layer at a time is checked against
    the model's own forward before calibrating; every quantized weight lies on RTN's grid of its source
    weight, each layer's output moves less than RTN's, and the output loads in transformers."""
    import json
    import shutil

    from safetensors.torch import load_file

    from surgery.demo_models import demo_model
    from surgery.demo_models.zoo import save_tiny, tiny_config
    from tests.reference import load

    config = tiny_config(model_type)
    config.vocab_size = 2048  # the demo tokenizer's
    base = save_tiny(config, tmp_path / model_type)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model("tiny-llama") / name, base / name)
    out = tmp_path / "out"
    keep = "    keep: [embed, lm_head, norms, altup]\n" if model_type == "gemma3n_text" else ""  # 4-column matrices
    plan = (f"model: {base}\noutput: {out}\nsteps:\n  - op: bits\n    width: 3\n{keep}"
            "    calibration: {data: builtin:mixed-dev, samples: 4, seq_len: 64}\n    quantizer: {method: gptq, group_size: 16}\n")
    from tests.conftest import write_plan

    result = cli("apply", write_plan(tmp_path, plan))
    assert result.code == 0, result.err
    fit = json.loads((out / "surgery.json").read_text())["fits"][0]["gptq"]
    assert all(g < r for g, r in zip(fit["output_error"]["gptq"], fit["output_error"]["rtn"]))
    source, written = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    changed = 0
    for name, w in source.items():
        if ".layers." not in name or w.dim() != 2 or torch.equal(written[name], w):
            continue
        rtn = quantize(w.float(), 3, 16, False, w.dtype)
        steps = (written[name].float().reshape(w.shape[0], -1, 16) / rtn.scale.float().unsqueeze(-1)
                 + rtn.zero.float().unsqueeze(-1))
        assert torch.allclose(steps, steps.round(), atol=1e-3), name  # on the grid
        assert steps.round().min() >= -4 and steps.round().max() <= 3, name
        changed += 1
    assert changed >= config.num_hidden_layers * 2
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    with torch.no_grad():
        assert torch.isfinite(load(out)(input_ids=ids, use_cache=False).logits).all()


def test_next_token_agreement_equals_torchs_kl_divergence():
    from surgery.demo_models import demo_model
    from surgery.evaluation.agreement import next_token_agreement
    from tests.reference import load

    base, prose = load(demo_model("base")), load(demo_model("prose"))
    rows = torch.randint(0, 2048, (3, 40), generator=torch.Generator().manual_seed(0))
    found = next_token_agreement(base, prose, rows)
    with torch.no_grad():
        p = torch.cat([base(input_ids=r[None]).logits[0] for r in rows]).double().log_softmax(-1)
        q = torch.cat([prose(input_ids=r[None]).logits[0] for r in rows]).double().log_softmax(-1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
    assert found.kl == pytest.approx(float(kl), rel=1e-9) and found.kl > 0
    assert found.top1 == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))
    assert found.tokens == 120
    assert next_token_agreement(base, base, rows).kl == pytest.approx(0, abs=1e-12)


def test_weighted_hessian_is_the_mean_of_2_r_x_xT_with_weights_of_mean_1():
    torch.manual_seed(1)
    x, r = torch.randn(12, 6), torch.rand(12) + 0.1
    h = Hessian(6, "cpu")
    h.add(x, r)
    w = (r / r.mean()).double()
    torch.testing.assert_close(h.matrix.double(), 2 * (x.double().T * w) @ x.double() / 12, rtol=1e-5, atol=1e-6)


def test_attention_concentration_equals_transformers_own_attention_probabilities():
    """Layer 0's importance of each token, from surgery's layer-by-layer replay, against the attention
    probabilities transformers returns with output_attentions (eager): summed over heads and queries,
    min-max scaled to [0.005, 1]."""
    from surgery.demo_models import demo_model
    from surgery.evaluation.layerwise import first_layer_inputs
    from surgery.evaluation.token_importance import layer_importance
    from tests.reference import load

    model = load(demo_model("base"))
    model.set_attn_implementation("eager")
    rows = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(3))
    inputs = first_layer_inputs(model, model.model.layers, rows)
    found = layer_importance(inputs, 0, model.model.layers[0])
    for row, importance in zip(rows, found):
        with torch.no_grad():
            probabilities = model(input_ids=row[None], output_attentions=True).attentions[0]
        received = probabilities.double().sum(dim=(0, 1, 2))
        expected = 0.005 + (received - received.min()) / (received.max() - received.min()) * 0.995
        torch.testing.assert_close(importance, expected, rtol=1e-6, atol=1e-9)
        assert float(importance.min()) == pytest.approx(0.005) and float(importance.max()) == pytest.approx(1)


def test_rsq_token_importance_changes_the_rounding_and_still_beats_rtn(cli, tmp_path):
    import json

    from safetensors.torch import load_file

    body = f"    width: 3\n{CALIBRATION}    quantizer: {{method: gptq, group_size: 32{{}}}}\n"
    plain = _bits(cli, tmp_path, body.replace("{}", ""), "plain")
    rsq = _bits(cli, tmp_path, body.replace("{}", ", token_importance: attention"), "rsq")
    fit = json.loads((rsq / "surgery.json").read_text())["fits"][0]["gptq"]
    assert fit["token_importance"] == {"by": "attention", "layers": list(range(8))}
    assert all(g < r for g, r in zip(fit["output_error"]["gptq"], fit["output_error"]["rtn"]))
    one, other = load_file(plain / "model.safetensors"), load_file(rsq / "model.safetensors")
    assert any(not torch.equal(one[n], other[n]) for n in one if ".layers." in n)
    (tmp_path / "bad.yaml").write_text((tmp_path / "rsq.yaml").read_text().replace("method: gptq", "method: rtn"))
    bad = cli("apply", tmp_path / "bad.yaml", "--out", tmp_path / "bad")
    assert bad.code == 2 and "token_importance is a GPTQ setting" in bad.err


def test_careless_quantization_plans_are_refused_before_any_work(cli, tmp_path):
    """Found by trying the tool as a new user: each of these is one line, exit 2, nothing written, and none
    runs a calibration or measurement first."""
    from surgery.demo_models import demo_model
    from tests.conftest import assert_plan_refused

    base = demo_model("base")
    done = _bits(cli, tmp_path, f"    width: 4\n{CALIBRATION}    quantizer: {{method: gptq, group_size: 32}}\n", "out")
    again = cli("apply", tmp_path / "out.yaml")
    assert again.code == 2 and again.err.strip().splitlines() == [f"error: output {done} already exists; pass --force "
                                                                   "to replace it"]
    cases = [
        (f"model: {base}\n", "    score: kl\n    assign: {target_bits: 1.5, choices: [2, 4]}\n"
         "    quantizer: {group_size: 32}\n", "target_bits 1.5 is below the smallest choice 2"),
        (f"model: {base}\n", "    assign: {high: 2, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 32}\n",
         "low (4) is wider than high (2)"),
        (f"model: {base}\n", "    width: 16\n    format: compressed-tensors\n    quantizer: {group_size: 32, symmetric: true}\n",
         "format compressed-tensors has nothing to pack"),
        (f"model: {demo_model('tiny-gpt2')}\n", "    width: 4\n    format: compressed-tensors\n"
         "    quantizer: {group_size: 16, symmetric: true}\n", "is stored (input, output) (GPT-2's Conv1D)"),
        (f"model: {base}\n", "    width: 4\n    calibration: {data: nosuch.txt}\n    quantizer: {method: gptq, group_size: 32}\n",
         "case4/nosuch.txt does not exist; give a .txt"),
    ]
    for number, (model, step, message) in enumerate(cases):
        folder = tmp_path / f"case{number}"
        folder.mkdir()
        assert_plan_refused(cli, folder, f"{model}output: {folder / 'out'}\nsteps:\n  - op: bits\n{step}", message)


def test_a_quantized_checkpoint_is_refused_by_every_quantizer(cli, tmp_path):
    """A compressed-tensors checkpoint stores integers and scales, not weights: rounding its scales again
    would write nonsense, so bits and ptqtp refuse it."""
    pytest.importorskip("compressed_tensors")
    from tests.conftest import assert_plan_refused

    packed = _bits(cli, tmp_path, "    width: 4\n    format: compressed-tensors\n"
                   "    quantizer: {group_size: 32, symmetric: true}\n", "packed")
    for op, step in (("bits", "    width: 4\n    quantizer: {group_size: 1}\n"), ("ptqtp", "    group_size: 1\n")):
        folder = tmp_path / op
        folder.mkdir()
        assert_plan_refused(cli, folder, f"model: {packed}\noutput: {folder / 'out'}\nsteps:\n  - op: {op}\n{step}",
                            "is already quantized (compressed-tensors); start from the full-precision checkpoint")


def test_gpt2s_conv1d_weights_are_rounded_in_groups_along_their_inputs(cli, tmp_path):
    """GPT-2 stores c_attn, c_proj and c_fc as (input, output): each group of 16 consecutive inputs of one
    output takes at most 16 values at 4 bits, which holds along the stored rows, not the columns."""
    from safetensors.torch import load_file

    from surgery.demo_models import demo_model
    from tests.conftest import write_plan

    out = tmp_path / "gpt2"
    plan = (f"model: {demo_model('tiny-gpt2')}\noutput: {out}\nsteps:\n  - op: bits\n    width: 2\n"
            "    quantizer: {group_size: 16}\n")
    assert cli("apply", write_plan(tmp_path, plan)).code == 0
    written = load_file(out / "model.safetensors")
    weight = written["transformer.h.0.attn.c_attn.weight"]  # (input 32, output 96)
    groups = weight.T.reshape(weight.shape[1], -1, 16)  # per output, groups of 16 inputs
    assert max(len(set(g.tolist())) for g in groups.reshape(-1, 16)) <= 4
