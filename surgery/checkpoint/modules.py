"""Which kind of module a tensor belongs to, from its name: attention, mlp, norm, embedding, other."""

from __future__ import annotations

_ATTENTION = {"attn", "self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "qkv_proj",
              "query_key_value", "query", "key", "value"}
_MLP = {"mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc",
        "intermediate", "dense_h_to_4h", "dense_4h_to_h", "experts", "block_sparse_moe", "w1", "w2", "w3"}
_EMBEDDING = {"embed_tokens", "wte", "wpe", "lm_head", "embeddings", "embed_in", "embed_out", "word_embeddings",
              "position_embeddings", "token_type_embeddings", "shared"}
MODULE_KINDS = ("attention", "mlp", "norm", "embedding", "other")


def module_kind(name: str) -> str:
    """Classify by the dotted parts of the name; norms first (an attention block's q_norm is a norm)."""
    parts = name.split(".")[:-1] or name.split(".")
    if any("norm" in p.lower() or p.startswith("ln") for p in parts):
        return "norm"
    if any(p in _EMBEDDING for p in parts):
        return "embedding"
    if any(p in _ATTENTION for p in parts):
        return "attention"
    if any(p in _MLP for p in parts) or parts[-1:] == ["output"] or ".output.dense" in f".{name}":
        return "mlp"
    return "other"


# Name parts of an MoE router (or a shared expert's gate): the module that picks the experts each token runs.
ROUTER_PARTS = frozenset({"gate", "router", "shared_expert_gate"})


def is_router(name: str) -> bool:
    """An MoE router's tensor: `mlp.gate.weight`, `mlp.router.weight`, `block_sparse_moe.gate.weight`."""
    return any(part in ROUTER_PARTS for part in name.split(".")[:-1])


def is_expert(name: str) -> bool:
    """An MoE expert's tensor, stored one by one (`mlp.experts.3.up_proj.weight`) or fused (`mlp.experts.gate_up_proj`)."""
    return "experts" in name.split(".")[:-1]
