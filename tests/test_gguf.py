"""llama.cpp's side of `bits`: the type file's names and types, and `surgery gguf`, which drives llama.cpp's
converter and llama-quantize and checks what they wrote. llama.cpp itself is built and run by
benchmarks/gguf_llama_cpp.py (too slow for the suite); here the tools are small stand-ins written with
the gguf package, llama.cpp's own GGUF library, so the orchestration and the check run everywhere."""

from __future__ import annotations

import json
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest

from surgery.demo_models import demo_model
from surgery.formats.gguf import GgufTensor, Matrix, gguf_name, gguf_type, tensor_types_file, type_mismatches
from tests.conftest import ARCHS, write_plan

GGUF_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma2": "GEMMA2",
              "gemma3_text": "GEMMA3", "phi3": "PHI3", "gpt2": "GPT2", "gpt_neox": "GPTNEOX"}

CONVERTER = '''
import json, sys
from pathlib import Path
import gguf
from safetensors.numpy import load_file
args = sys.argv[1:]
if "FAIL" in args[0]:
    sys.exit("NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
source, out = Path(args[0]), args[args.index("--outfile") + 1]
names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, json.loads((source / "config.json").read_text())["num_hidden_layers"])
writer = gguf.GGUFWriter(out, "llama")
for name, array in sorted(load_file(source / "model.safetensors").items()):
    writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array)
writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
'''
# As llama-quantize: the first matching line's type, other tensors as they were. It cannot make k-quants (gguf
# quantizes 32-block types only) and writes q5_0 for them, as llama-quantize does for a k-quant whose block does
# not fit: the substitution `surgery gguf` must catch.
QUANTIZE = '''
import re, sys
import gguf
from gguf import GGMLQuantizationType as T
args = sys.argv[1:]
rules = [line.split("=") for line in open(args[args.index("--tensor-type-file") + 1]).read().split()]
base, out = args[-3], args[-2]
writer = gguf.GGUFWriter(out, "llama")
for tensor in gguf.GGUFReader(base).tensors:
    data = tensor.data.reshape(tuple(reversed([int(n) for n in tensor.shape])))
    kind = next((k for p, k in rules if re.search(p, tensor.name)), None)
    if kind is None or kind == "f32":
        writer.add_tensor(tensor.name, data)
        continue
    qtype = T[kind.upper()] if not kind.endswith("_k") else T.Q5_0
    writer.add_tensor(tensor.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
'''


@pytest.mark.parametrize("width, columns, symmetric, kind", [
    (4, 4096, True, "q4_k"), (4, 576, True, "q4_0"), (4, 576, False, "q4_1"), (6, 1536, True, "q6_k"),
    (6, 576, False, "q8_0"), (5, 96, True, "q5_0"), (5, 96, False, "q5_1"), (3, 576, True, "q4_0"),
    (2, 2048, False, "q2_k"), (8, 576, False, "q8_0"), (4, 100, True, "f32"), (16, 4096, True, "f32"),
])
def test_the_llama_cpp_type_fits_the_tensors_rows(width, columns, symmetric, kind):
    """A k-quant only where rows divide by 256 (llama.cpp's QK_K), else the narrowest 32-block type at least
    as wide (never fewer bits than asked; with a minimum per block where the plan has zero points), else the
    tensor's own dtype: llama-quantize then honours every line."""
    assert gguf_type(width, columns, symmetric, "f32") == kind


@pytest.mark.parametrize("arch", [a for a in ARCHS if a in GGUF_ARCHS])
def test_gguf_names_are_llama_cpps_own(tiny, arch):
    """Every matrix bits quantizes is named as llama.cpp's own table (the gguf package's TensorNameMap) names
    it; phi3's fused qkv_proj was once taken for a v_proj."""
    gguf = pytest.importorskip("gguf")
    from surgery.checkpoint.reader import Checkpoint

    checkpoint = Checkpoint.open(tiny(arch))
    layers = checkpoint.config.get("num_hidden_layers") or checkpoint.config["n_layer"]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCHS[arch]), layers)
    matrices = [n for n, t in checkpoint.tensors.items() if len(t.shape) == 2 and re.search(r"\.0\.", n)
                and not re.search(r"embed|wte|wpe|lm_head", n)]
    assert matrices
    for name in matrices:
        suffix = re.split(r"\.0\.", name, maxsplit=1)[1]
        assert f"blk.0.{gguf_name(suffix)}.weight" == names.get_name(name, try_suffixes=(".weight",)), name


def test_the_file_names_every_matrix_of_a_layer_kept_ones_at_their_own_dtype():
    """llama-quantize gives a tensor no line names its default type: a matrix kept by name in a rounded layer,
    and every matrix of a kept layer, get a line with their own dtype; what no type holds is said."""
    layers = [{"self_attn.q_proj.weight": Matrix(96, "BF16", True),
               "self_attn.o_proj.weight": Matrix(96, "F32", False),
               "mlp.down_proj.weight": Matrix(256, "BF16", True)},
              {"self_attn.q_proj.weight": Matrix(48, "F16", True),
               "mlp.experts.gate_up_proj": Matrix(48, "F16", True)}]
    file = tensor_types_file(layers, [4, 8], symmetric=False)
    assert file.text.splitlines() == [r"blk\.0\.(attn_output)\.weight=f32", r"blk\.0\.(attn_q)\.weight=q4_1",
                                      r"blk\.0\.(ffn_down)\.weight=q4_k", r"blk\.1\.(attn_q)\.weight=f16"]
    assert file.fallbacks == ["blk.0.attn_q (96 columns): q4_1 for q4_k"]
    assert file.unfit == ["mlp.experts.gate_up_proj of layer 1 (no GGUF name known)", "blk.1.attn_q (48 columns)"]


def test_the_converter_keeps_every_source_dtype(tmp_path):
    """Its --outtype is the source's one dtype, else f32, which holds float16 and bfloat16 exactly."""
    import torch
    from safetensors.torch import save_file

    from surgery.checkpoint.reader import Checkpoint
    from surgery.llama_cpp import source_float_type

    for dtypes, want in (([torch.bfloat16], "bf16"), ([torch.float16], "f16"), ([torch.bfloat16, torch.float32], "f32")):
        folder = tmp_path / want
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        save_file({f"m{i}.weight": torch.zeros(4, 4, dtype=d) for i, d in enumerate(dtypes)} | {"n.weight": torch.zeros(4)},
                  folder / "model.safetensors")
        assert source_float_type(Checkpoint.open(folder)) == want


def test_type_mismatches_names_each_way_a_gguf_can_differ_from_the_file():
    shape = (96, 48)
    base = {n: GgufTensor("f32", shape) for n in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                                  "blk.0.attn_norm.weight", "blk.1.attn_q.weight")}
    rules = [(re.compile(r"blk\.0\.(attn_k|attn_q)\.weight"), "q4_k"), (re.compile(r"blk\.1\.(attn_q)\.weight"), "f32")]
    right = base | {"blk.0.attn_q.weight": GgufTensor("q4_k", shape), "blk.0.attn_k.weight": GgufTensor("q4_k", shape)}
    assert type_mismatches(rules, base, right, [2 * 96 * 48, 0]) == []
    substituted = right | {"blk.0.attn_k.weight": GgufTensor("q5_0", shape)}
    assert type_mismatches(rules, base, substituted, [2 * 96 * 48, 0]) == [
        "blk.0.attn_k.weight: q5_0 [96, 48], expected q4_k [96, 48]"]
    requantized = right | {"token_embd.weight": GgufTensor("q8_0", shape)}
    assert type_mismatches(rules, base, requantized, [2 * 96 * 48, 0]) == [
        "token_embd.weight: q8_0 [96, 48], expected f32 [96, 48]"]
    # a line naming no tensor (llama.cpp spells it otherwise), and the plan's weights not all quantized
    unnamed = rules + [(re.compile(r"blk\.0\.(attn_v)\.weight"), "q4_k")]
    assert type_mismatches(unnamed, base, right, [3 * 96 * 48, 0]) == [
        r"line 3 (blk\.0\.(attn_v)\.weight) names no tensor",
        f"layer 0: {2 * 96 * 48} weights quantized, the plan quantized {3 * 96 * 48}"]
    # a kept bfloat16 matrix of a model converted to f32 goes back to bf16: a float type, not a quantized weight
    kept = [(re.compile(r"blk\.1\.(attn_q)\.weight"), "bf16"), *rules[:1]]
    assert type_mismatches(kept, base, right | {"blk.1.attn_q.weight": GgufTensor("bf16", shape)}, [2 * 96 * 48, 0]) == []
    missing = {n: t for n, t in right.items() if n != "blk.0.attn_norm.weight"}
    assert type_mismatches(rules, base, missing, [2 * 96 * 48, 0]) == ["blk.0.attn_norm.weight: missing"]


def test_gguf_tensors_reads_types_and_shapes_in_gguf_order(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from surgery.formats.gguf import gguf_tensors

    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    matrix = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    writer.add_tensor("a.weight", matrix)
    q = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("b.weight", gguf.quants.quantize(matrix, q), raw_dtype=q)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    assert gguf_tensors(tmp_path / "m.gguf") == {"a.weight": GgufTensor("f32", (96, 48)),
                                                 "b.weight": GgufTensor("q8_0", (96, 48))}


def _tools(folder: Path) -> list[str]:
    converter, quantize = folder / "convert_hf_to_gguf.py", folder / "llama-quantize"
    converter.write_text(CONVERTER)
    quantize.write_text(f"#!{sys.executable}\n{QUANTIZE}")
    quantize.chmod(quantize.stat().st_mode | stat.S_IEXEC)
    return ["--llama-cpp", str(folder), "--quantize", str(quantize), "--python", sys.executable]


def _bits_output(cli, folder: Path, source: Path, step: str) -> Path:
    out = folder / "out"
    plan = write_plan(folder, f"model: {source}\noutput: {out}\nsteps:\n  - op: bits\n{step}")
    assert cli("apply", plan).code == 0
    return out


def test_gguf_writes_the_plans_types_and_nothing_else(cli, tmp_path):
    pytest.importorskip("gguf")
    tools = _tools(tmp_path)
    out = _bits_output(cli, tmp_path, demo_model("base"), "    width: 8\n    quantizer: {group_size: 32}\n")
    result = cli("gguf", out, tmp_path / "m.gguf", *tools)
    assert result.code == 0, result.err
    assert "wrote" in result.out and "56 q8_0" in result.out and "19 f32" in result.out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["convert_hf_to_gguf.py", "llama-quantize", "m.gguf",
                                                                 "out", "plan.yaml"])
    assert cli("gguf", out, tmp_path / "m.gguf", *tools).code == 2  # exists
    assert cli("gguf", out, tmp_path / "m.gguf", *tools, "--force").code == 0


def test_gguf_keeps_what_the_plan_keeps_and_reads_a_relative_model_path(cli, tmp_path):
    """Matrices kept by name in a rounded layer stay f32 (llama-quantize would give an unnamed one its default
    type); a plan naming its model relative to itself works as written."""
    pytest.importorskip("gguf")
    tools = _tools(tmp_path)
    shutil.copytree(demo_model("base"), tmp_path / "source")
    out = _bits_output(cli, tmp_path, Path("source/"), "    width: 8\n    quantizer: {group_size: 32}\n"
                       "    keep: [embed, lm_head, norms, q_proj]\n")
    result = cli("gguf", out, tmp_path / "m.gguf", *tools)
    assert result.code == 0, result.err
    assert "48 q8_0" in result.out and "27 f32" in result.out


def test_gguf_refuses_a_file_whose_types_llama_quantize_substituted(cli, tmp_path):
    """Width 4 asks q4_k for down_proj (256 columns); the stand-in writes q5_0, as llama-quantize does where a
    k-quant does not fit: exit 1, the tensor named, nothing written."""
    pytest.importorskip("gguf")
    tools = _tools(tmp_path)
    out = _bits_output(cli, tmp_path, demo_model("base"), "    width: 4\n    quantizer: {group_size: 32}\n")
    result = cli("gguf", out, tmp_path / "m.gguf", *tools)
    assert result.code == 1
    assert "did not write the plan's types for 8 tensors (blk.0.ffn_down.weight: q5_0 [256, 96], expected q4_k" in result.err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


def test_gguf_refuses_what_it_cannot_make_exactly(cli, tmp_path):
    pytest.importorskip("gguf")
    tools = _tools(tmp_path)
    source = tmp_path / "source"
    shutil.copytree(demo_model("base"), source)
    out = _bits_output(cli, tmp_path, source, "    width: 8\n    quantizer: {group_size: 32}\n")
    (tmp_path / "d.gguf").mkdir()
    cases = {
        "not a surgery output (no surgery.json)": (source, "m.gguf"),
        "name the output file *.gguf": (out, "m.bin"),
        "is a folder; name the GGUF file": (out, "d.gguf"),
        "no converter given": (out, "m.gguf", "--quantize", tools[3]),
        "llama-quantize not found": (out, "m.gguf", "--converter", tools[1] + "/convert_hf_to_gguf.py"),
    }
    true = tmp_path / "true"
    true.write_text("#!/bin/sh\nexit 0\n")
    true.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("")
    cases |= {
        "is inside": (out, "out/m.gguf"),
        "is not an executable file": (out, "m.gguf", "--llama-cpp", tools[1], "--quantize", str(plain)),
        "is not a file": (out, "m.gguf", "--converter", str(tmp_path), "--quantize", tools[3]),
    }
    for message, (folder, name, *flags) in cases.items():
        result = cli("gguf", folder, tmp_path / name, *(flags or tools))
        assert result.code == 2 and message in result.err, (message, result.err)
    result = cli("gguf", out, tmp_path / "m.gguf", "--llama-cpp", tools[1], "--quantize", str(true), "--python", sys.executable)
    assert result.code == 1 and "exited 0 but wrote no file" in result.err
    assert cli("gguf", out, source / "m.gguf", *tools).err.count("is inside") == 1  # the source, an input
    dropped = tmp_path / "dropped"
    assert cli("apply", write_plan(tmp_path, f"model: {source}\noutput: {dropped}\nsteps:\n  - op: chain\n"
                                   "    layers: [0, 1, 2, 4, 5, 6, 7]\n", "drop.yaml")).code == 0
    result = cli("gguf", dropped, tmp_path / "m.gguf", *tools)
    assert result.code == 2 and "the plan must be that one step" in result.err
    failing = tmp_path / "FAIL"
    shutil.copytree(source, failing)
    (tmp_path / "f").mkdir()
    result = cli("gguf", _bits_output(cli, tmp_path / "f", failing, "    width: 8\n    quantizer: {group_size: 32}\n"), tmp_path / "m.gguf", *tools)
    assert result.code == 1 and "convert_hf_to_gguf.py failed (exit 1): NotImplementedError: BPE pre-tokenizer" in result.err
    config = json.loads((source / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    save_file(load_file(source / "model.safetensors"), source / "model.safetensors", metadata={"format": "pt", "x": "1"})
    (source / "config.json").write_text(json.dumps(config))
    assert "has changed since" in cli("gguf", out, tmp_path / "m.gguf", *tools).err
    record = json.loads((out / "surgery.json").read_text())
    (out / "surgery.json").write_text(json.dumps(record | {"plan": "bits"}))
    assert "is not as surgery writes it" in cli("gguf", out, tmp_path / "m.gguf", *tools).err
    record["fits"][0]["llama_cpp"]["unfit"] = ["blk.0.attn_q (48 columns)"]
    (out / "surgery.json").write_text(json.dumps(record))
    assert "no llama.cpp type holds blk.0.attn_q (48 columns)" in cli("gguf", out, tmp_path / "m.gguf", *tools).err
    record["fits"][0]["llama_cpp"]["unfit"] = []
    (out / "surgery.json").write_text(json.dumps(record))
    types = out / "llama-tensor-types.txt"
    types.write_text(types.read_text().replace("q8_0", "q2_k", 1))
    assert "is not the file bits wrote (it was edited)" in cli("gguf", out, tmp_path / "m.gguf", *tools).err
    from surgery.errors import SurgeryError
    from surgery.formats.gguf import read_tensor_types

    types.write_text("blk\\.0\\.(attn_q)\\.weight=q8_0\n\nblk\\.(0=q4_0\n")
    with pytest.raises(SurgeryError, match=r"llama-tensor-types.txt:3: .*missing \)"):
        read_tensor_types(types)  # a hand-made file reaches it only through the library
    assert [p.name for p in tmp_path.rglob("*.gguf")] == ["d.gguf"]
