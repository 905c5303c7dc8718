"""`heal`: an edited model trained toward the model it came from. Shared parameters stay shared (one tensor
per slot, gradients summed over depths), what does not train keeps its bytes, the written model is the
trained one, the same seed gives the same bytes, an interrupted run resumes to the uninterrupted result,
and healing lowers the held-out perplexity of a tied and of a dropped demo model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.demo_models import demo_model
from tests.conftest import listing, write_plan

HEAL = ("  - op: heal\n    data: builtin:mixed-dev\n    max_tokens: 8192\n    window: 64\n    steps: {steps}\n"
        "    checkpoint_every: 4\n{extra}")
TIE = "  - op: tie\n    loops: 2\n    relax: {rank: 8}\n"
DROP = "  - op: chain\n    layers: [0-4, 7]\n"


def _plan(folder: Path, edit: str, heal: str | None, steps: int = 30, extra: str = "", name: str = "out") -> Path:
    body = edit + (HEAL.format(steps=steps, extra=extra) if heal is not None else "")
    return write_plan(folder, f"model: {demo_model('base')}\noutput: {folder / name}\nsteps:\n{body}", f"{name}.yaml")


def _heal_record(out: Path) -> dict:
    return next(f["heal"] for f in json.loads((out / "surgery.json").read_text())["fits"] if "heal" in f)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def _held_out_perplexity(model, tokenizer, window: int = 64) -> float:
    """Perplexity on the heal's held-out windows (the last tenth of the first 8192 tokens), computed here."""
    from surgery.evaluation.data import first_tokens, load_text

    ids = first_tokens(tokenizer, load_text("builtin:mixed-dev").text, 8192)
    count = len(ids) // window
    held = torch.tensor(ids[: count * window]).view(count, window)[count - max(1, round(count * 0.1)):]
    with torch.no_grad():
        logits = model(input_ids=held).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tied demo model unhealed and healed (relaxation and shared, the default for a relaxed tie)."""
    from surgery.pipeline import apply

    root = tmp_path_factory.mktemp("tied")
    return apply(_plan(root, TIE, None, name="unhealed")).output, apply(_plan(root, TIE, "heal", name="healed")).output


def test_a_healed_tie_stays_compact_with_one_tensor_per_slot_and_lowers_held_out_perplexity(tied):
    unhealed, healed = tied
    config = json.loads((healed / "config.json").read_text())
    assert config["model_type"] == "surgery_recursive"
    before, after = _tensors(unhealed), _tensors(healed)
    assert before.keys() == after.keys()  # the same compact layout: slots 0-3 once, per-depth LoRA and norms
    assert {n.split(".")[2] for n in after if n.startswith("model.layers.")} == {"0", "1", "2", "3"}
    assert all(not torch.equal(before[n], after[n]) for n in after if n.startswith("model.layers.") and "proj" in n)
    record = _heal_record(healed)
    assert record["trained"] == ["relaxation", "shared"]
    held = record["held_out"]
    # measured here: KL 0.076 -> 0.030, perplexity 338.2 -> 317.4 (teacher 302.7); the margins hold on any CPU
    assert held["after"]["kl"] < 0.6 * held["before"]["kl"]
    assert held["after"]["perplexity"] < 0.98 * held["before"]["perplexity"]
    assert held["teacher_perplexity"] < held["after"]["perplexity"]


def test_the_written_tied_model_is_the_trained_one(tied):
    """surgery's compact loader on the output scores the held-out windows as the trained student did."""
    from surgery.evaluation.loading import load_for_eval

    _, healed = tied
    loaded = load_for_eval(healed, "cpu", "float32")
    assert loaded.parameters < 0.8 * load_for_eval(demo_model("base"), "cpu", "float32").parameters  # still shared
    measured = _held_out_perplexity(loaded.model, loaded.tokenizer)
    assert measured == pytest.approx(_heal_record(healed)["held_out"]["after"]["perplexity"], rel=1e-5)


def test_a_shared_slot_gets_the_sum_of_its_depths_gradients(tied):
    """The loader heal trains through (one Parameter per slot, a hook per relaxed depth) gives each shared
    tensor the sum of the gradients of the depths using it, and each depth's B the gradient of its own
    depth's weight times A^T: checked against the same model materialized (every depth its own weight)."""
    from transformers import AutoModelForCausalLM

    from surgery.checkpoint.reader import Checkpoint
    from surgery.evaluation.loading import load_for_eval
    from surgery.evaluation.recursive_model import stored_parameters
    from surgery.formats.recursive import read_spec

    unhealed, _ = tied
    spec, _ = read_spec(Checkpoint.open(unhealed))
    compact = load_for_eval(unhealed, "cpu", "float32").model.requires_grad_(True)
    tensors = _tensors(unhealed)
    dense = AutoModelForCausalLM.from_pretrained(demo_model("base"), dtype=torch.float32)
    with torch.no_grad():
        for depth, slot in enumerate(spec.loop_map):
            layer = dense.model.layers[depth]
            for name, param in layer.named_parameters():
                shared = tensors.get(f"model.layers.{slot}.{name}", tensors.get(f"depths.{depth}.{name}"))
                if name in spec.ranks:
                    module = name.removesuffix(".weight")
                    shared = shared + tensors[f"depths.{depth}.{module}.lora_B.weight"] @ tensors[
                        f"depths.{depth}.{module}.lora_A.weight"]
                param.copy_(shared)
    batch = torch.arange(64).view(1, 64) * 7 % 2048
    for model in (compact, dense):
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
    by_name = stored_parameters(compact, spec)
    suffix = "self_attn.q_proj.weight"
    for slot in range(spec.slots):
        expected = sum(dense.model.layers[d].get_parameter(suffix).grad for d, s in enumerate(spec.loop_map) if s == slot)
        torch.testing.assert_close(by_name[f"model.layers.{slot}.{suffix}"].grad, expected, rtol=1e-4, atol=1e-7)
    depth_grad = dense.model.layers[5].get_parameter(suffix).grad
    a = tensors["depths.5.self_attn.q_proj.lora_A.weight"]
    torch.testing.assert_close(by_name["depths.5.self_attn.q_proj.lora_B.weight"].grad, depth_grad @ a.T,
                               rtol=1e-4, atol=1e-7)


def test_lora_only_healing_changes_nothing_else(tied, tmp_path, cli):
    unhealed, _ = tied
    assert cli("apply", _plan(tmp_path, TIE, "heal", steps=6, extra="    train: relaxation\n")).code == 0
    before, after = _tensors(unhealed), _tensors(tmp_path / "out")
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert len(changed) == len([n for n in after if ".lora_" in n])


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
    """Layers 5 and 6 of the demo model dropped, unhealed and healed by adapters on layers 4 and 5."""
    from surgery.pipeline import apply

    root = tmp_path_factory.mktemp("dropped")
    adapter = "    adapter: {rank: 8, layers: [4, 5], modules: [q_proj, v_proj, down_proj]}\n    lr: 0.005\n"
    return (apply(_plan(root, DROP, None, name="unhealed")).output,
            apply(_plan(root, DROP, "heal", extra=adapter, name="healed")).output, adapter)


def test_adapter_healing_of_a_drop_changes_only_the_adapted_matrices_and_loads_in_transformers(dropped):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unhealed, healed, _ = dropped
    before, after = _tensors(unhealed), _tensors(healed)
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (4, 5)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    model, info = AutoModelForCausalLM.from_pretrained(healed, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    record = _heal_record(healed)
    measured = _held_out_perplexity(model, AutoTokenizer.from_pretrained(healed))
    assert measured == pytest.approx(record["held_out"]["after"]["perplexity"], rel=1e-4)  # the merge is the adapter
    held = record["held_out"]  # measured here: KL 0.029 -> 0.013, perplexity 327.3 -> 317.4 (teacher 302.7)
    gap = held["before"]["perplexity"] - held["teacher_perplexity"]
    assert held["after"]["perplexity"] < held["before"]["perplexity"] - 0.2 * gap
    assert held["after"]["kl"] < 0.6 * held["before"]["kl"]


def test_the_same_seed_gives_the_same_bytes_and_an_interrupted_run_resumes_to_them(dropped, tmp_path, cli,
                                                                                   monkeypatch):
    from surgery.ops import heal_train

    _, healed, adapter = dropped
    plan = _plan(tmp_path, DROP, "heal", extra=adapter)
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))  # nothing remembered from the fixture's run
    scored = heal_train.held_out_scores
    calls = []

    def stop_at_the_fifth(*args, **kwargs):  # before training, then steps 6, 12, 18: interrupted at step 24
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return scored(*args, **kwargs)

    monkeypatch.setattr(heal_train, "held_out_scores", stop_at_the_fifth)
    result = cli("apply", plan)
    assert result.code == 130
    assert "interrupted at step 24 of 30; the checkpoint of step 20 is kept" in result.err and "--resume" in result.err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(heal_train, "held_out_scores", scored)
    result = cli("apply", plan, "--resume")
    assert result.code == 0, result.err
    assert "continuing from the checkpoint of step 20" in result.err
    assert _tensors(tmp_path / "out").keys() == _tensors(healed).keys()
    for name, value in _tensors(tmp_path / "out").items():
        assert torch.equal(value, _tensors(healed)[name]), name


@pytest.mark.parametrize("edit, extra, message", [
    (DROP, "    train: shared\n", "train: shared trains a compact recursive model"),
    ("  - op: tie\n    loops: 2\n", "    train: relaxation\n", "relaxation needs per-depth LoRA"),
    (TIE, "    train: adapter\n", "use relaxation"),
    ("  - op: bits\n    width: 8\n", "", "heal after bits would move the quantized weights off their grid"),
    (DROP, "    tokens: 1000\n", "give either 'steps' or 'tokens'"),
    (DROP, "    train: [all, adapter]\n", "train: all already trains every parameter"),
    (DROP, "    adapter: {layers: [9]}\n", "adapter layer 9 does not exist"),
    (DROP, "    teacher: ./missing\n", "missing"),
    (DROP, "    adapter: {write: peft}\n  - op: chain\n    layers: [0-3]\n", "write: peft must be the last step"),
    ("  - op: task_arithmetic\n    models: [./prose]\n", "", "heal after task_arithmetic needs 'teacher:'"),
    (DROP, "    max_tokens: 128\n    window: 64\n    held_out: 0.75\n", "leaving none to train on"),
    (DROP, "    data: .\n", "is a folder"),
    (DROP, "    lr: 1.0e+30\n", "training diverged"),
])
def test_bad_heal_steps_are_refused_before_writing(cli, tmp_path, edit, extra, message, monkeypatch):
    plan = _plan(tmp_path, edit, "heal", extra=extra)
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))  # after the demo model's path is resolved
    result = cli("apply", plan)
    assert result.code == 2, result.err
    assert message in result.err and "Traceback" not in result.err
    assert "keeping its top" not in result.err or "diverged" in message  # refused before the teacher scored
    assert not (tmp_path / "out").exists()
    assert listing(tmp_path / "cache" / "fits") == []  # a refused heal leaves nothing in the fits cache


def test_too_little_text_is_refused(cli, tmp_path):
    (tmp_path / "short.txt").write_text("a few words only")
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n{DROP}"
                      "  - op: heal\n    data: short.txt\n")  # relative to the plan's folder
    result = cli("apply", plan)
    assert result.code == 2 and "short.txt has" in result.err and "fewer than two windows of 128" in result.err


def test_every_ops_data_file_is_relative_to_the_plan(cli, tmp_path, monkeypatch):
    """bits' calibration and atlas' learning text, like heal's and evaluate's, are found beside the plan,
    whatever the current folder."""
    from surgery.evaluation.data import load_text

    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "calibration.txt").write_text(load_text("builtin:mixed-dev").text[:60000])
    monkeypatch.chdir(tmp_path)
    bits = write_plan(plans, f"model: {demo_model('base')}\noutput: {tmp_path / 'bits'}\nsteps:\n  - op: bits\n"
                      "    score: lim\n    calibration: {data: calibration.txt, samples: 2, seq_len: 64}\n"
                      "    assign: {high: 8, low: 4, low_fraction: 0.5}\n    quantizer: {group_size: 32}\n", "bits.yaml")
    assert cli("apply", bits).code == 0
    atlas = write_plan(plans, f"base: {demo_model('base')}\noutput: {tmp_path / 'atlas'}\nsteps:\n  - op: atlas\n"
                       f"    models: [{demo_model('prose')}]\n    granularity: module\n"
                       "    learn: {data: calibration.txt, steps: 2, max_tokens: 512}\n", "atlas.yaml")
    assert cli("apply", atlas).code == 0


def test_a_peft_adapter_beside_the_unchanged_model_computes_the_merged_model(dropped, tmp_path, cli, monkeypatch):
    """write: peft leaves the weights as the drop wrote them and puts the adapter beside them; surgery's loader
    (without peft) and transformers with peft both compute what the merged heal of the same run wrote."""
    from transformers import AutoModelForCausalLM

    from surgery.evaluation.loading import load_for_eval

    unhealed, merged, adapter = dropped
    peft_adapter = adapter.replace("down_proj]}", "down_proj], write: peft}")
    assert cli("apply", _plan(tmp_path, DROP, "heal", extra=peft_adapter)).code == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors").read_bytes() == (unhealed / "model.safetensors").read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and len(config["target_modules"]) == 6
    ids = torch.arange(96).view(1, 96) * 11 % 2048
    expected = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
    import transformers.integrations.peft as transformers_peft

    monkeypatch.setattr(transformers_peft, "is_peft_available", lambda: False)  # as on a machine without peft
    own = load_for_eval(out, "cpu", "float32").model
    assert not getattr(own, "_hf_peft_config_loaded", False)  # surgery's own hooks, not peft's
    torch.testing.assert_close(own(input_ids=ids).logits, expected, rtol=0, atol=2e-5)
    monkeypatch.undo()
    pytest.importorskip("peft")
    with_peft = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert with_peft._hf_peft_config_loaded
    torch.testing.assert_close(with_peft(input_ids=ids).logits, expected, rtol=0, atol=2e-5)


def test_heal_is_deterministic_with_dropout_and_conv1d_adapters_merge_as_peft_applies_them(tiny, cli, tmp_path,
                                                                                          monkeypatch):
    """GPT-2 (dropout 0.1 in its config, Conv1D weights stored in x out): dropout stays off while healing, so two
    runs in fresh caches write the same bytes; its PEFT adapter computes the merged model."""
    from transformers import AutoModelForCausalLM

    from surgery.evaluation.loading import load_for_eval

    assert json.loads((tiny("gpt2") / "config.json").read_text())["resid_pdrop"] > 0
    heal = ("  - op: heal\n    data: builtin:mixed-dev\n    max_tokens: 2048\n    window: 64\n    steps: 6\n"
            "    adapter: {layers: [1, 2]%s}\n")
    outputs = []
    for run, extra in (("a", ""), ("b", ""), ("peft", ", write: peft")):
        plan = write_plan(tmp_path, f"model: {tiny('gpt2')}\noutput: {tmp_path / run}\nsteps:\n  - op: chain\n"
                          f"    layers: [0-2]\n" + heal % extra, f"{run}.yaml")
        monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / f"cache-{run}"))
        assert cli("apply", plan).code == 0
        outputs.append(tmp_path / run)
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()
    ids = torch.arange(64).view(1, 64) * 5 % 1000
    merged = AutoModelForCausalLM.from_pretrained(outputs[0], dtype=torch.float32)(input_ids=ids).logits
    adapted = load_for_eval(outputs[2], "cpu", "float32").model(input_ids=ids).logits
    torch.testing.assert_close(adapted, merged, rtol=0, atol=2e-5)


def test_a_teacher_of_another_vocabulary_is_refused_before_it_scores(cli, tmp_path, monkeypatch):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(teacher)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model("base") / name, teacher / name)
    plan = _plan(tmp_path, DROP, "heal", extra=f"    teacher: {teacher}\n")
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    result = cli("apply", plan)
    assert result.code == 2 and "vocabulary (2048 tokens) differs from the teacher's (1000)" in result.err
    assert listing(tmp_path / "cache" / "fits") == [] and not (tmp_path / "out").exists()
