"""llama.cpp's side of a bit assignment: GGUF tensor names and types for `llama-quantize
--tensor-type-file`, so a GGUF made from the dense output gets the same per-layer widths."""

from __future__ import annotations

TENSOR_TYPES_FILE = "llama-tensor-types.txt"
GGUF_TYPES = {8: "q8_0", 7: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "qkv_proj": "attn_qkv",
              "gate_up_proj": "ffn_up", "c_attn": "attn_qkv", "attn.c_proj": "attn_output", "c_fc": "ffn_up",
              "mlp.c_proj": "ffn_down", "query_key_value": "attn_qkv", "attention.dense": "attn_output",
              "dense_h_to_4h": "ffn_up", "dense_4h_to_h": "ffn_down"}


def tensor_types_file(targets: list[str], widths: list[int]) -> str:
    """One `regex=type` line per layer for llama-quantize --tensor-type-file (GGUF tensor names)."""
    names = sorted({GGUF_NAMES[key] for suffix in targets for key in GGUF_NAMES
                    if suffix.removesuffix(".weight").endswith(key)})
    if not names:
        return ""
    group = "|".join(names)
    return "".join(f"blk\\.{i}\\.({group})\\.weight={GGUF_TYPES.get(w, 'f16')}\n" for i, w in enumerate(widths))
