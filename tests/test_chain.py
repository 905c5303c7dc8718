"""`chain` on every architecture: the written checkpoint equals the same surgery done in memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from surgery.checkpoint.reader import DTYPE_SIZES, Checkpoint
from surgery.demo_models.models import ENCODERS
from tests.conftest import ARCHS, write_plan
from tests.reference import chain_in_memory, layer_list, load, outputs

CHAINS = {
    "drop": [0, 1, 2, 5],
    "loop": [0, 1, 2, 3, 2, 3, 4, 5],
    "reorder": [0, 2, 1, 3, 5, 4],
}
IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 3, 250, 12, 600, 8, 31, 2000, 4, 90],
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])


def _apply(cli, tmp_path: Path, model: Path, layers: str, extra: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {model}\noutput: {out}\n{extra}steps:\n  - op: chain\n    layers: {layers}\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    return out


@pytest.mark.parametrize("edit", list(CHAINS))
@pytest.mark.parametrize("arch", ARCHS)
def test_chain_equals_in_memory_surgery(arch, edit, tiny, cli, tmp_path):
    encoder = arch in ENCODERS
    source = tiny(arch)
    picks = CHAINS[edit]
    out = _apply(cli, tmp_path, source, json.dumps(picks))

    original = load(source, encoder)
    reference = chain_in_memory(original, [(original, i) for i in picks])
    edited = load(out, encoder)
    assert edited.config.num_hidden_layers == len(picks)
    assert torch.equal(outputs(edited, IDS, encoder), outputs(reference, IDS, encoder))
    # and the edit really changed the model
    assert not torch.equal(outputs(edited, IDS, encoder), outputs(original, IDS, encoder))


def _perturbed_copy(source: Path, dest: Path) -> Path:
    """A second model of the same architecture and size with different weights."""
    model = load(source)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(dest)
    return dest


def test_frankenmerge_equals_in_memory_surgery(tiny, cli, tmp_path):
    a = tiny("llama")
    b = _perturbed_copy(a, tmp_path / "b")
    layers = f"\n      - {{model: {a}, layers: 0-3}}\n      - {{model: {b}, layers: 2-5}}"
    out = _apply(cli, tmp_path, a, layers)
    model_a, model_b = load(a), load(b)
    picks = [(model_a, i) for i in range(4)] + [(model_b, i) for i in range(2, 6)]
    reference = chain_in_memory(model_a, picks)
    assert torch.equal(outputs(load(out), IDS), outputs(reference, IDS))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scaled_duplicates_equal_in_memory_scaling(arch, tiny, cli, tmp_path):
    source = tiny(arch)
    module = {"llama": "o_proj", "gpt2": "c_proj"}[arch]
    layers = f"\n      - {{layers: 0-3}}\n      - {{layers: 2-3, scale: {{{module}: 0.5}}}}\n      - 4-5"
    out = _apply(cli, tmp_path, source, layers)
    original = load(source)
    picks = [0, 1, 2, 3, 2, 3, 4, 5]
    reference = chain_in_memory(original, [(original, i) for i in picks], scales={4: {module: 0.5}, 5: {module: 0.5}})
    assert torch.equal(outputs(load(out), IDS), outputs(reference, IDS))


def test_copied_tensors_are_byte_identical(tiny, cli, tmp_path):
    source = Checkpoint.open(tiny("llama"))  # sharded source: copies cross shard files
    out = _apply(cli, tmp_path, source.path, "[5, 0-2, 2]")
    written = Checkpoint.open(out)
    picks = [5, 0, 1, 2, 2]
    assert len(written.tensors) == len(source.tensors) - 6 * 9 + len(picks) * 9
    for name, info in written.tensors.items():
        match = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        source_name = f"model.layers.{picks[int(match[1])]}.{match[2]}" if match else name
        original = source.tensors[source_name]
        with open(original.file, "rb") as f1, open(info.file, "rb") as f2:
            f1.seek(original.start)
            f2.seek(info.start)
            assert f1.read(original.nbytes) == f2.read(info.nbytes), name


def test_sharded_output_loads_and_has_an_index(tiny, cli, tmp_path):
    source = tiny("llama")
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {source}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0-5, 3-5]\n")
    result = cli("apply", plan, "--shard-size", "200KB")
    assert result.code == 0, result.err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == Checkpoint.open(out).total_bytes
    for shard in shards:
        assert (out / shard).stat().st_size <= 200_000 + 64 * 1024  # one tensor may overflow, as in transformers
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    original = load(source)
    reference = chain_in_memory(original, [(original, i) for i in [0, 1, 2, 3, 4, 5, 3, 4, 5]])
    assert torch.equal(outputs(load(out), IDS), outputs(reference, IDS))


def test_shards_are_aligned_and_header_padded(tiny, cli, tmp_path):
    """Every tensor starts at a multiple of its element size: packed weights mix I64, I32 and F32."""
    plan = write_plan(tmp_path, f"model: {tiny('llama')}\noutput: {tmp_path / 'out'}\nsteps:\n  - op: bits\n"
                      "    score: zd\n    assign: {high: 8, low: 4, low_fraction: 0.5}\n"
                      "    quantizer: {group_size: 16, symmetric: true}\n    format: compressed-tensors\n")
    assert cli("apply", plan).code == 0
    out = Checkpoint.open(tmp_path / "out")
    assert {DTYPE_SIZES[info.dtype] for info in out.tensors.values()} >= {8, 4}
    for shard in out.shards:
        with open(shard.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        assert header_len % 8 == 0
        for info in shard.tensors.values():
            assert (info.start - 8 - header_len) % DTYPE_SIZES[info.dtype] == 0, info.name


def test_a_layer_order_change_is_verified_against_transformers(cli, tiny, tmp_path):
    """Moving layers is checked on the meta device with transformers' own class before writing, and
    the record says so (a copy of the tensors alone is no proof the output loads as the plan says)."""
    out = tmp_path / "out"
    plan = write_plan(tmp_path, f"model: {tiny('llama')}\noutput: {out}\nsteps:\n  - op: chain\n    layers: [0, 1, 5]\n")
    result = cli("apply", plan)
    assert result.code == 0, result.err
    record = json.loads((out / "surgery.json").read_text())
    assert record["structure"].startswith("structure checked against transformers") and "LlamaForCausalLM" in record["structure"]


def test_tensors_of_every_width_start_aligned_whatever_their_order():
    """The writer's layout itself: odd-sized narrow tensors listed before wide ones must not misalign them."""
    from surgery.checkpoint.writer import ShardEntry, plan_shards, shard_header

    shapes = {"U8": (5,), "BF16": (3,), "F32": (3,), "I64": (2,), "F16": (1,), "F64": (1,)}
    tensors = {dtype.lower(): ShardEntry(dtype.lower(), dtype, shape) for dtype, shape in shapes.items()}
    (shard,) = plan_shards(tensors, "5GB")
    raw = shard_header(tensors, shard.names)
    header = json.loads(raw[8:])
    assert len(raw) % 8 == 0 and int.from_bytes(raw[:8], "little") == len(raw) - 8
    for name in shard.names:
        assert header[name]["data_offsets"][0] % DTYPE_SIZES[tensors[name].dtype] == 0, name


def test_per_layer_config_lists_follow_their_layers(tiny, cli, tmp_path):
    # qwen2's fixture has no layer_types in config.json: transformers derives them from max_window_layers
    qwen = _apply(cli, tmp_path / "q", tiny("qwen2"), "[5, 0, 4]")
    assert json.loads((qwen / "config.json").read_text())["layer_types"] == [
        "sliding_attention", "full_attention", "sliding_attention"
    ]
    gemma = _apply(cli, tmp_path / "g", tiny("gemma3_text"), "[2, 0, 5, 1]")
    config = json.loads((gemma / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert config["num_hidden_layers"] == 4


def test_tied_embeddings_are_respected(tiny, cli, tmp_path):
    source = Checkpoint.open(tiny("gpt2"))
    out = Checkpoint.open(_apply(cli, tmp_path, source.path, "[0, 1]"))
    outside = {n for n in source.tensors if ".h." not in n}
    assert outside == {n for n in out.tensors if ".h." not in n}
    assert "lm_head.weight" not in out.tensors
    model = load(out.path)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_side_files_and_provenance_are_written(tiny, cli, tmp_path):
    source = tiny("mistral")
    out = _apply(cli, tmp_path, source, "[0-2]")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    provenance = json.loads((out / "surgery.json").read_text())
    assert provenance["layer_map"] == [f"{source}[{i}]" for i in range(3)]
    hashes = provenance["sources"][str(source)]["header_sha256"]
    assert set(hashes) == {"model.safetensors"} and len(hashes["model.safetensors"]) == 64
    assert provenance["surgery_version"]


def test_rerun_is_byte_identical(tiny, cli, tmp_path):
    first = _apply(cli, tmp_path / "1", tiny("qwen3"), "[0, 3, 3, 1]")
    second = _apply(cli, tmp_path / "2", tiny("qwen3"), "[0, 3, 3, 1]")
    for name in ("model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_layers_found_for_each_layout(tiny):
    from surgery.formats.inspection import inspect

    prefixes = {arch: inspect(tiny(arch))["layer_prefix"] for arch in ARCHS}
    assert prefixes["gpt2"] == "transformer.h"
    assert prefixes["gpt_neox"] == "gpt_neox.layers"
    assert prefixes["bert"] == "encoder.layer"
    assert prefixes["llama"] == "model.layers"
    for arch in ARCHS:
        model = load(tiny(arch), arch in ENCODERS)
        assert len(layer_list(model)[2]) == 6
