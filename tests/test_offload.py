"""Scoring a model larger than the memory it may use: `eval --max-memory` keeps at most that many bytes
of weights on the device (here the CPU: the rest wait on disk and come in layer by layer), and the
score is the uncapped one."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from surgery.demo_models import demo_model
from surgery.evaluation.loading import load_for_eval
from tests.conftest import write_plan

needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="needs accelerate (pip install 'surgery[offload]')")
CAP = "2MiB"


def _model_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@needs_accelerate
def test_a_model_larger_than_the_cap_waits_on_disk_and_scores_as_uncapped(cli):
    base = demo_model("base")
    assert _model_bytes(base) > 4 << 20  # well over the cap
    loaded = load_for_eval(base, "cpu", "float32", max_memory=2 << 20)
    placed = list(loaded.model.hf_device_map.values())
    assert placed[:2] == ["cpu", "cpu"] and placed.count("disk") > len(placed) // 2  # the first layers fit
    args = ("eval", base, "--no-compare", "--max-tokens", "600", "--window", "128", "--device", "cpu", "--json")
    uncapped = json.loads(cli(*args).out)
    capped = cli(*args, "--max-memory", CAP)
    assert capped.code == 0, capped.err
    assert json.loads(capped.out)["perplexity"] == pytest.approx(uncapped["perplexity"], rel=1e-6)
    assert json.loads(capped.out)["max_memory"] == 2 << 20 and "max_memory" not in uncapped  # tokens/s pays for it


@needs_accelerate
def test_a_compared_base_is_capped_too(cli, tmp_path):
    base = demo_model("base")
    plan = write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n    layers: [0-5, 7]\n")
    assert cli("apply", plan, "--no-fsync").code == 0
    args = ("eval", tmp_path / "out", "--max-tokens", "300", "--window", "64", "--device", "cpu", "--json")
    uncapped = json.loads(cli(*args).out)
    capped = json.loads(cli(*args, "--max-memory", CAP).out)
    assert capped["base_perplexity"] == pytest.approx(uncapped["base_perplexity"], rel=1e-6)
    assert capped["perplexity"] == pytest.approx(uncapped["perplexity"], rel=1e-6)


@pytest.mark.parametrize("size, message", [("lots", "not a size"), ("10KB", "at least 1MiB")])
def test_a_bad_cap_is_one_line(size, message, cli):
    result = cli("eval", demo_model("base"), "--no-compare", "--max-memory", size)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err


@needs_accelerate
def test_a_plans_evaluate_section_scores_under_its_cap_and_its_gates_too(cli, tmp_path):
    base = demo_model("base")
    body = (f"model: {base}\nsteps:\n  - op: chain\n    layers: [0-5, 7]\nevaluate:\n  max_tokens: 300\n"
            "  window: 64\n  device: cpu\n  limits:\n    kl: 10\n")
    reports = {}
    for name, cap in (("free", ""), ("capped", f"  max_memory: {CAP}\n")):
        plan = write_plan(tmp_path, f"output: {tmp_path / name}\n{body}{cap}", name=f"{name}.yaml")
        result = cli("apply", plan, "--no-fsync")
        assert result.code == 0, result.err
        reports[name] = json.loads((tmp_path / name / "surgery.json").read_text())
    free, capped = (reports[k] for k in ("free", "capped"))
    assert capped["evaluation"]["perplexity"] == pytest.approx(free["evaluation"]["perplexity"], rel=1e-6)
    assert capped["quality_gates"]["measured"]["kl"] == pytest.approx(free["quality_gates"]["measured"]["kl"], abs=1e-6)


def test_a_bad_cap_in_a_plan_is_refused_before_writing(cli, tmp_path):
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: chain\n"
                                "    layers: [0-5, 7]\nevaluate:\n  max_memory: 12KB\n")
    result = cli("apply", plan)
    assert result.code == 2 and "at least 1MiB" in result.err and not (tmp_path / "out").exists()


def test_a_cap_on_a_compact_output_is_refused_by_check_before_writing(cli, tmp_path):
    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: tie\n"
                                "    loops: 2\nevaluate:\n  max_memory: 2MiB\n")
    for command in ("check", "apply"):
        result = cli(command, plan)
        assert result.code == 2 and "memory cap loads standard checkpoints only" in result.err
    assert not (tmp_path / "out").exists()


def test_a_config_its_tensors_do_not_fit_is_one_line(tiny, cli, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny("qwen2"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    result = cli("eval", broken, "--no-compare")
    assert result.code == 2 and "cannot load it as a causal LM" in result.err and "Traceback" not in result.err


def _fitted_under_and_over_the_cap(cli, tmp_path, monkeypatch, step: str, device: str = "cpu",
                                   waits: str = "on disk") -> dict[str, Path]:
    """The same bits step applied without a cap and under one, each fit run afresh (its own fits cache);
    under the cap, the rest of the model waits where `waits` says."""
    base = demo_model("base")
    outputs = {}
    for name, cap in (("free", ()), ("capped", ("--max-memory", CAP))):
        monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / f"cache-{name}"))  # the fixtures' paths are fixed above
        plan = write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / name}\nsteps:\n  - op: bits\n{step}",
                          name=f"{name}.yaml")
        result = cli("apply", plan, "--no-fsync", "--device", device, *cap)
        assert result.code == 0, result.err
        assert (f"the rest waits {waits}" in result.err) == bool(cap)
        outputs[name] = tmp_path / name
    return outputs


GPTQ = "    width: 4\n    calibration: {data: builtin:mixed-dev, samples: 2, seq_len: 64}\n" \
       "    quantizer: {method: gptq, group_size: 32}\n"


@needs_accelerate
def test_gptq_calibrates_layer_by_layer_under_a_cap_and_writes_the_uncapped_model(cli, tmp_path, monkeypatch):
    """Layers 1-7 wait on disk: GPTQ reads each weight from there, the quantized layer replaces it for the
    next layer's inputs, and the output is the uncapped one bit for bit; the input model is untouched."""
    from safetensors.torch import load_file

    from surgery.checkpoint.digest import file_blake3

    shard = demo_model("base") / "model.safetensors"
    before = file_blake3(shard)
    outputs = _fitted_under_and_over_the_cap(cli, tmp_path, monkeypatch, GPTQ)
    free, capped = (load_file(outputs[k] / "model.safetensors") for k in ("free", "capped"))
    assert free.keys() == capped.keys() and all(torch.equal(free[k], capped[k]) for k in free)
    assert file_blake3(shard) == before


@needs_accelerate
@pytest.mark.parametrize("score", [
    "    score: kl\n    assign: {target_bits: 3, choices: [2, 4]}\n",
    "    score: lim\n    assign: {high: 4, low: 2, low_fraction: 0.5}\n",
])
def test_layer_scores_measured_under_a_cap_equal_the_uncapped_ones(score, cli, tmp_path, monkeypatch):
    """KL costs (each layer rounded where it waits, then restored) and LIM scores: the same fit, recorded."""
    outputs = _fitted_under_and_over_the_cap(cli, tmp_path, monkeypatch, (
        f"{score}    calibration: {{data: builtin:mixed-dev, samples: 2, seq_len: 64}}\n"
        "    quantizer: {group_size: 32}\n"))
    free, capped = (json.loads((outputs[k] / "surgery.json").read_text())["fits"][0] for k in ("free", "capped"))
    assert capped == free


@needs_accelerate
def test_analyze_under_a_cap_measures_what_it_measures_uncapped(cli):
    args = ("analyze", demo_model("base"), "--samples", "4", "--seq-len", "64", "--device", "cpu", "--json")
    free, capped = json.loads(cli(*args).out), json.loads(cli(*args, "--max-memory", CAP).out)
    assert capped == free


def test_a_fit_that_holds_whole_models_refuses_a_cap_before_writing(cli, tmp_path, monkeypatch):
    base = demo_model("base")
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))  # nothing remembered: the fit would run
    plan = write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / 'out'}\nsteps:\n"
                                "  - op: heal\n    data: builtin:mixed-dev\n    steps: 2\n    train: all\n")
    for command in ("check", "apply"):
        result = cli(command, plan, "--max-memory", CAP)
        assert result.code == 2 and "cannot keep to --max-memory" in result.err, result.err
    assert not (tmp_path / "out").exists()


ATLAS = "  - op: atlas\n    models: [CODE, PROSE]\n    granularity: GRANULARITY\n" \
        "    learn: {data: builtin:mixed-dev, steps: 3, max_tokens: 1024, batch_size: 4, window: 64}\n"


@needs_accelerate
@pytest.mark.parametrize("granularity", ["layer", "tensor"])
def test_atlas_learns_under_a_cap_what_it_learns_in_memory(granularity, cli, tmp_path, monkeypatch):
    """Under a cap smaller than the base and its task vectors in float32, each tensor is read from the three
    checkpoints whenever the forward (or a layer's forward again, for its backward) uses it: the coefficients
    and the merged model are the in-memory run's bit for bit, and the inputs are untouched. A cap that holds
    them all learns in memory."""
    from surgery.checkpoint.digest import file_blake3

    base, code, prose = (demo_model(n) for n in ("base", "code", "prose"))
    shards = [folder / "model.safetensors" for folder in (base, code, prose)]
    before = [file_blake3(shard) for shard in shards]
    step = ATLAS.replace("CODE", str(code)).replace("PROSE", str(prose)).replace("GRANULARITY", granularity)
    runs = {}
    for name, cap in (("free", ()), ("capped", ("--max-memory", CAP)), ("roomy", ("--max-memory", "1GiB"))):
        monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / f"cache-{name}"))  # each fit afresh
        plan = write_plan(tmp_path, f"model: {base}\nbase: {base}\noutput: {tmp_path / name}\nsteps:\n{step}",
                          name=f"{name}.yaml")
        result = cli("apply", plan, "--no-fsync", "--device", "cpu", *cap)
        assert result.code == 0, result.err
        assert ("read from the checkpoints when the forward uses it" in result.err) == (name == "capped"), result.err
        runs[name] = tmp_path / name
    fits = {k: json.loads((folder / "surgery.json").read_text())["fits"] for k, folder in runs.items()}
    assert fits["capped"] == fits["free"] == fits["roomy"]
    free = (runs["free"] / "model.safetensors").read_bytes()
    assert all((runs[k] / "model.safetensors").read_bytes() == free for k in ("capped", "roomy"))
    assert [file_blake3(shard) for shard in shards] == before


@needs_accelerate
@pytest.mark.parametrize("granularity", ["layer", "tensor"])
@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "llama", "gpt_neox"])
def test_the_streamed_merge_learns_what_the_in_memory_one_does_on_each_architecture(arch, granularity, tiny,
                                                                                     tmp_path):
    """Tied heads (gpt2, gemma2: the head takes the embedding's merge), Conv1D weights, a sharded checkpoint
    (llama), a head stored under another name (gpt_neox's embed_out): the streamed path's coefficients are
    the in-memory path's bit for bit, over 20 steps."""
    from safetensors.torch import load_file, save_file

    from surgery.checkpoint.reader import Checkpoint
    from surgery.ops.atlas import blocks_of
    from surgery.ops.atlas_learn import LearnSettings, learn_coefficients
    from surgery.recipe.view import standard_view

    folder = tiny(arch)
    variants = []
    for seed in (1, 2):
        variant = shutil.copytree(folder, tmp_path / f"variant-{seed}")
        generator = torch.Generator().manual_seed(seed)
        for shard in variant.glob("*.safetensors"):
            tensors = load_file(shard)
            save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}, shard,
                      {"format": "pt"})
        variants.append(variant)
    base = standard_view(Checkpoint.open(folder), "base")
    models = [standard_view(Checkpoint.open(v), v.name) for v in variants]
    block_of = blocks_of(base, granularity)
    blocks = list(dict.fromkeys(block_of.values()))
    settings = LearnSettings(data=["builtin:mixed-dev"], steps=20, max_tokens=512, batch_size=2, window=32, device="cpu")
    logs: list[str] = []
    free = learn_coefficients(base, models, block_of, blocks, settings, logs.append)
    capped = learn_coefficients(base, models, block_of, blocks, settings, logs.append, max_memory=1)
    assert any("read from the checkpoints" in line for line in logs)
    assert capped == free
    assert torch.tensor(free).abs().sum() > 0  # the coefficients moved


@needs_accelerate
def test_atlas_under_a_cap_on_a_base_without_a_tokenizer_is_one_line(cli, tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(demo_model("base"), base, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    step = ATLAS.replace("CODE", str(demo_model("code"))).replace("PROSE", str(demo_model("prose")))
    plan = write_plan(tmp_path, f"model: {base}\nbase: {base}\noutput: {tmp_path / 'out'}\nsteps:\n"
                                + step.replace("GRANULARITY", "layer"))
    result = cli("apply", plan, "--max-memory", CAP, "--device", "cpu")
    assert result.code == 2 and "has no tokenizer files" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


@needs_accelerate
def test_atlas_under_a_cap_refuses_experts_transformers_fuses_from_several_tensors():
    """Mixtral's experts are one parameter built from a tensor per expert: not computed tensor by tensor, refused."""
    from surgery.checkpoint.reader import Checkpoint
    from surgery.demo_models.zoo import tiny_checkpoint, zoo
    from surgery.errors import SurgeryError
    from surgery.evaluation.merged_model import StreamedMerge
    from surgery.ops.atlas import blocks_of
    from surgery.recipe.view import standard_view

    base = standard_view(Checkpoint.open(tiny_checkpoint(next(zoo(["mixtral"])))), "mixtral")
    with pytest.raises(SurgeryError, match=r"experts.* is not one tensor mixtral stores; learn without --max-memory"):
        StreamedMerge(base, [base], blocks_of(base, "layer"), "cpu")


@needs_accelerate
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_under_a_cap_on_cuda_equals_uncapped_cuda(cli, tmp_path, monkeypatch):
    """On a GPU the layers beyond the cap wait in CPU memory (accelerate's other store); the same bits."""
    from safetensors.torch import load_file

    outputs = _fitted_under_and_over_the_cap(cli, tmp_path, monkeypatch, GPTQ, "cuda", "in CPU memory")
    free, capped = (load_file(outputs[k] / "model.safetensors") for k in ("free", "capped"))
    assert all(torch.equal(free[k], capped[k]) for k in free)

@needs_accelerate
@pytest.mark.parametrize("layer", [0, 7])  # layer 0 stays in memory under the cap, layer 7 waits on disk
def test_a_parameter_is_read_written_and_reset_wherever_the_cap_placed_it(layer):
    from safetensors import safe_open

    from surgery.evaluation.models import layer_modules
    from surgery.evaluation.parameters import ParameterSlot

    base = demo_model("base")
    loaded = load_for_eval(base, "cpu", "float32", max_memory=2 << 20)
    slot = ParameterSlot(layer_modules(loaded.model, "model.layers", 8)[layer], "mlp.down_proj.weight")
    with safe_open(base / "model.safetensors", "pt") as f:
        stored = f.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight").float()
    assert torch.equal(slot.read(), stored)
    slot.write(stored * 2)
    assert torch.equal(slot.read(), stored * 2)
    slot.reset()
    assert torch.equal(slot.read(), stored)


@pytest.mark.parametrize("size, expected", [("2097152", 2 << 20), ("2097152B", 2 << 20), ("2MiB", 2 << 20),
                                            ("2.5GB", 2_500_000_000)])
def test_a_cap_reads_bytes_with_or_without_their_unit(size, expected):
    from surgery.formatting import memory_bytes

    assert memory_bytes(size) == expected


@needs_accelerate
@pytest.mark.parametrize("write", ["merged", "peft"])
def test_heal_trains_its_adapters_under_a_cap_as_it_does_uncapped(write, cli, tmp_path, monkeypatch):
    """Teacher and student both wait on disk beyond the cap; the adapters train through accelerate's hooks,
    each layer's weights brought in again for its backward (gradient checkpointing), and what is written
    (the merged weights, or the PEFT adapter) is the uncapped run's."""
    from safetensors.torch import load_file

    from surgery.evaluation import loading

    placed: list[set[str]] = []  # where each model the heal loads has its weights
    load_model = loading.load_model

    def spied(*args, **kwargs):
        model = load_model(*args, **kwargs)
        placed.append(set(map(str, (getattr(model, "hf_device_map", None) or {}).values())))
        return model

    monkeypatch.setattr(loading, "load_model", spied)
    base = demo_model("base")
    written = {}
    for name, cap in (("free", ()), ("capped", ("--max-memory", CAP))):
        placed.clear()
        monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / f"cache-{name}"))
        plan = write_plan(tmp_path, f"model: {base}\noutput: {tmp_path / name}\nsteps:\n  - op: chain\n"
                                    "    layers: [0-4, 7]\n  - op: heal\n    data: builtin:mixed-dev\n"
                                    "    max_tokens: 2048\n    window: 64\n    steps: 3\n    batch_size: 4\n"
                                    f"    adapter: {{rank: 4, write: {write}}}\n", name=f"{name}.yaml")
        result = cli("apply", plan, "--no-fsync", "--device", "cpu", *cap)
        assert result.code == 0, result.err
        assert len(placed) == 2 and all(("disk" in where) == bool(cap) for where in placed)  # teacher, student
        assert ("under the memory cap" in result.err) == bool(cap)
        files = ("adapter_model.safetensors",) if write == "peft" else ("model.safetensors",)
        written[name] = {f: load_file(tmp_path / name / f) for f in files}
    for file, tensors in written["free"].items():
        capped = written["capped"][file]
        assert tensors.keys() == capped.keys()
        assert all(torch.allclose(tensors[k], capped[k], rtol=1e-5, atol=1e-7) for k in tensors), file


def test_a_compact_reference_under_a_cap_is_refused_before_any_model_loads(cli, tmp_path, monkeypatch):
    from surgery.evaluation import run

    plan = write_plan(tmp_path, f"model: {demo_model('base')}\noutput: {tmp_path / 'tied'}\nsteps:\n  - op: tie\n"
                                "    loops: 2\n")
    assert cli("apply", plan, "--no-fsync").code == 0
    loads = []
    monkeypatch.setattr(run, "load_for_eval", lambda *args, **kwargs: loads.append(args))
    result = cli("eval", demo_model("base"), "--compare", tmp_path / "tied", "--max-memory", CAP)
    assert result.code == 2 and "memory cap loads standard checkpoints only" in result.err and not loads
