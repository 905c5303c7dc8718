"""llama.cpp's side of a bit assignment: GGUF tensor names and types for `llama-quantize
--tensor-type-file`, so a GGUF made from the source model gets the plan's per-layer widths; and the
check that a GGUF llama-quantize wrote holds exactly those types (it substitutes a type that does not
fit a tensor without failing)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint.modules import is_expert
from surgery.errors import SurgeryError

TENSOR_TYPES_FILE = "llama-tensor-types.txt"
FLOAT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # a kept tensor stays in its source dtype
# llama.cpp's k-quants cut each row into 256-weight blocks, its older types into 32-weight ones: a k-quant only
# fits a tensor whose rows (GGUF's ne[0], the weight's columns) divide by 256, else llama-quantize replaces it.
K_QUANTS = {8: "q8_0", 7: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}
# The 32-block types, never narrower than asked: _0 has a scale per block (symmetric), _1 a scale and a
# minimum (a zero point, as an asymmetric plan's groups have); llama-quantize offers no q8_1.
BLOCK_32 = {True: {8: "q8_0", 7: "q8_0", 6: "q8_0", 5: "q5_0", 4: "q4_0", 3: "q4_0", 2: "q4_0"},
            False: {8: "q8_0", 7: "q8_0", 6: "q8_0", 5: "q5_1", 4: "q4_1", 3: "q4_1", 2: "q4_1"}}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "qkv_proj": "attn_qkv",
              "gate_up_proj": "ffn_up", "c_attn": "attn_qkv", "attn.c_proj": "attn_output", "c_fc": "ffn_up",
              "mlp.c_proj": "ffn_down", "query_key_value": "attn_qkv", "attention.dense": "attn_output",
              "dense_h_to_4h": "ffn_up", "dense_4h_to_h": "ffn_down"}
LINE = re.compile(r"^(\S+)=([a-z0-9_]+)$")


def gguf_type(width: int, columns: int, symmetric: bool, float_type: str) -> str:
    """The llama.cpp type for `width` bits whose block fits rows of `columns` weights: the k-quant where the
    columns divide by 256, else the narrowest 32-block type at least that wide, else `float_type` (the
    tensor's own dtype: a kept layer, or rows no block fits)."""
    if width in K_QUANTS and columns % 256 == 0:
        return K_QUANTS[width]
    if width in BLOCK_32[symmetric] and columns % 32 == 0:
        return BLOCK_32[symmetric][width]
    return float_type


def gguf_name(suffix: str) -> str | None:
    """The GGUF name of a layer's matrix (`self_attn.q_proj.weight` -> attn_q), matched on whole name parts, so
    phi3's `qkv_proj` is never taken for a `v_proj`."""
    if not suffix.endswith(".weight") or is_expert(suffix):
        return None  # MoE experts: llama.cpp stacks them into ffn_*_exps, a layout of its own
    parts = suffix.removesuffix(".weight").split(".")
    return next((GGUF_NAMES[key] for key in GGUF_NAMES if parts[-len(key.split(".")):] == key.split(".")), None)


@dataclass(frozen=True)
class Matrix:
    """A layer's matrix as the type file sees it."""

    columns: int  # a row's length: the input dimension
    dtype: str  # the source dtype, which a kept matrix keeps
    quantized: bool  # the plan rounds it


@dataclass(frozen=True)
class TypeFile:
    text: str  # `regex=type` lines
    fallbacks: list[str]  # where a k-quant did not fit and a 32-block type was named, in words
    unfit: list[str]  # matrices the plan rounds that no llama.cpp type (or no GGUF name) holds


def tensor_types_file(layers: list[dict[str, Matrix]], widths: list[int], symmetric: bool) -> TypeFile:
    """`regex=type` lines for llama-quantize --tensor-type-file (GGUF tensor names), one per layer and type,
    naming every matrix of the layer: those the plan rounds at its width's type, the others (kept, by
    layer or by name) at their own dtype, since llama-quantize gives an unnamed tensor its default type."""
    lines, fallbacks, unfit = [], [], []
    for layer, (matrices, width) in enumerate(zip(layers, widths)):
        chosen: dict[str, set[str]] = {}
        for suffix, matrix in sorted(matrices.items()):
            name, own = gguf_name(suffix), FLOAT_TYPES.get(matrix.dtype, "f16")
            if name is None:
                if matrix.quantized:
                    unfit.append(f"{suffix} of layer {layer} (no GGUF name known)")
                continue
            kind = gguf_type(width, matrix.columns, symmetric, own) if matrix.quantized else own
            chosen.setdefault(kind, set()).add(name)
            if matrix.quantized and kind == own:
                unfit.append(f"blk.{layer}.{name} ({matrix.columns} columns)")
            elif matrix.quantized and width in K_QUANTS and kind != K_QUANTS[width]:
                fallbacks.append(f"blk.{layer}.{name} ({matrix.columns} columns): {kind} for {K_QUANTS[width]}")
        lines += [f"blk\\.{layer}\\.({'|'.join(sorted(names))})\\.weight={kind}\n" for kind, names in sorted(chosen.items())]
    return TypeFile("".join(lines), fallbacks, unfit)


def read_tensor_types(path: Path) -> list[tuple[re.Pattern[str], str]]:
    """The (pattern, type) lines of a tensor-type file, in order (llama-quantize takes the first match)."""
    rules = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = LINE.match(line.strip())
        try:
            pattern = re.compile(match[1]) if match else None
        except re.error as e:
            pattern, line = None, f"{line} ({e})"
        if match is None or pattern is None:
            raise SurgeryError(f"{path}:{number}: {line!r} is not a regex=type line; write the file again with "
                               "`surgery apply` (it is bits' output, not meant to be edited)")
        rules.append((pattern, match[2]))
    return rules


@dataclass(frozen=True)
class GgufTensor:
    kind: str  # the ggml type's name, lower case as llama-quantize spells it: q4_k, f32
    shape: tuple[int, ...]  # GGUF's order: ne[0] (a row's length) first

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def gguf_reader() -> type:
    """The gguf package's reader (llama.cpp's own), or the one line saying how to install it."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SurgeryError("reading GGUF needs the gguf package: pip install 'surgery[gguf]'") from None
    return GGUFReader


def gguf_tensors(path: Path) -> dict[str, GgufTensor]:
    """Each tensor's type and shape, from the file's header."""
    reader_class = gguf_reader()
    try:
        reader = reader_class(path)
    except (ValueError, OSError) as e:
        raise SurgeryError(f"{path}: not a GGUF file gguf can read ({e})") from None
    return {t.name: GgufTensor(t.tensor_type.name.lower(), tuple(int(n) for n in t.shape)) for t in reader.tensors}


def type_mismatches(rules: list[tuple[re.Pattern[str], str]], base: dict[str, GgufTensor],
                    quantized: dict[str, GgufTensor], layer_weights: list[int]) -> list[str]:
    """Where `quantized` is not `base` with the rules' types, in words: a tensor named by a rule must have
    its type, every other tensor its type in `base`, every rule must name a tensor, and each layer's
    changed tensors must hold exactly the weights the plan quantized in it (`layer_weights`), so a
    tensor the rules missed (a name llama.cpp spells otherwise) is found too. A float type is not a quantized one:
    a kept bfloat16 matrix of a model converted to f32 goes back to bf16, exactly."""
    problems = [f"{name}: missing" for name in base if name not in quantized]
    problems += [f"{name}: not in the converted model" for name in quantized if name not in base]
    used: set[int] = set()
    changed = [0] * len(layer_weights)
    for name, tensor in quantized.items():
        if name not in base:
            continue
        rule = next((i for i, (pattern, _) in enumerate(rules) if pattern.search(name)), None)
        expected = base[name].kind if rule is None else rules[rule][1]
        if rule is not None:
            used.add(rule)
        if tensor.kind != expected or tensor.shape != base[name].shape:
            problems.append(f"{name}: {tensor.kind} {list(tensor.shape)}, expected {expected} {list(base[name].shape)}")
        layer = re.match(r"blk\.(\d+)\.", name)
        if layer and int(layer[1]) < len(changed) and tensor.kind not in FLOAT_TYPES.values():
            changed[int(layer[1])] += tensor.size
    problems += [f"line {i + 1} ({rules[i][0].pattern}) names no tensor" for i in range(len(rules)) if i not in used]
    problems += [f"layer {i}: {got} weights quantized, the plan quantized {want}"
                 for i, (got, want) in enumerate(zip(changed, layer_weights)) if got != want]
    return problems
