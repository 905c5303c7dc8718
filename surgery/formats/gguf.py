"""llama.cpp's side of a bit assignment: GGUF tensor names and types for `llama-quantize
--tensor-type-file`, so a GGUF made from the dense output gets the same per-layer widths."""

from __future__ import annotations

TENSOR_TYPES_FILE = "llama-tensor-types.txt"
# llama.cpp's k-quants cut each row into 256-weight blocks, its older types into 32-weight ones: a k-quant only
# fits a tensor whose rows (GGUF's ne[0], the weight's columns) divide by 256, else llama-quantize replaces it.
K_QUANTS = {8: "q8_0", 7: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}
BLOCK_32 = {8: "q8_0", 7: "q8_0", 6: "q8_0", 5: "q5_0", 4: "q4_0", 3: "q4_0", 2: "q4_0"}  # never narrower
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "qkv_proj": "attn_qkv",
              "gate_up_proj": "ffn_up", "c_attn": "attn_qkv", "attn.c_proj": "attn_output", "c_fc": "ffn_up",
              "mlp.c_proj": "ffn_down", "query_key_value": "attn_qkv", "attention.dense": "attn_output",
              "dense_h_to_4h": "ffn_up", "dense_4h_to_h": "ffn_down"}


def gguf_type(width: int, columns: int) -> str:
    """The llama.cpp type for `width` bits whose block fits rows of `columns` weights: the k-quant where the
    columns divide by 256, else the narrowest 32-block type at least that wide, else f16."""
    if width in K_QUANTS and columns % 256 == 0:
        return K_QUANTS[width]
    if width in BLOCK_32 and columns % 32 == 0:
        return BLOCK_32[width]
    return "f16"


def tensor_types_file(columns: list[dict[str, int]], widths: list[int]) -> tuple[str, list[str]]:
    """`regex=type` lines for llama-quantize --tensor-type-file (GGUF tensor names), one per layer and type,
    from each layer's quantized tensors (suffix -> columns); and, in words, where a k-quant did not fit."""
    lines, notes = [], []
    for layer, (tensors, width) in enumerate(zip(columns, widths)):
        chosen: dict[str, set[str]] = {}
        for suffix, count in sorted(tensors.items()):
            name = next((GGUF_NAMES[key] for key in GGUF_NAMES if suffix.removesuffix(".weight").endswith(key)), None)
            if name is None:
                continue
            kind = gguf_type(width, count)
            chosen.setdefault(kind, set()).add(name)
            if width in K_QUANTS and kind != K_QUANTS[width]:
                notes.append(f"blk.{layer}.{name} ({count} columns): {kind} for {K_QUANTS[width]}")
        lines += [f"blk\\.{layer}\\.({'|'.join(sorted(names))})\\.weight={kind}\n" for kind, names in sorted(chosen.items())]
    return "".join(lines), notes
