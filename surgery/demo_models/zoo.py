"""Tiny random checkpoints of every model type the installed transformers ships, for the architecture tests.

Each model type's own config class gives the defaults; the sizes are shrunk to a few thousand
parameters (every key the config has among `SIZES`, in nested sub-configs too), so a model of each
type builds in well under a second. Types whose config cannot be made small this way are reported
with the reason, not hidden.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.config import TOKEN_ID_KEYS

# Small values for the config keys that size a model; a key is set only where the config has it.
SIZES: dict[str, int] = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "linear_units": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "kv_channels": 16,
    "num_hidden_layers": 4, "n_layer": 4, "num_layers": 4, "n_layers": 4,
    "vocab_size": 256, "max_position_embeddings": 512, "n_positions": 512,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "mamba_d_state": 8, "ssm_state_size": 8, "state_size": 8, "mamba_n_heads": 4, "mamba_d_head": 32,
    "mamba_head_dim": 32, "mamba_expand": 2, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "lru_width": 64, "attention_window_size": 16,
    "sliding_window": 16, "image_size": 32, "patch_size": 8, "num_channels": 3, "rotary_dim": 8,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "encoder_layers": 4, "decoder_layers": 4, "projector_hidden_size": 64, "out_hidden_size": 64,
    "mm_tokens_per_image": 16, "d_ff": 128, "d_kv": 16, "d_head": 16, "mamba_d_ssm": 128,
    "attention_hidden_size": 128, "attention_head_dim": 32, "mamba_headdim": 16, "adapter_rank": 8,
    "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, "global_head_dim": 32, "num_decoder_layers": 4, "depth": 4,
    "vision_output_dim": 64, "projector_input_dim": 64, "projector_output_dim": 64, "intermediate_size_mlp": 128,
    "dim_ff": 128, "dff": 128, "mlp_dim": 128, "expert_ffn_hidden_size": 32, "emb_dim": 64, "decoder_vocab_size": 256,
    "unpadded_vocab_size": 256, "shape_vocab_size": 256, "shape_embed_dim": 16, "pronunciation_vocab_size": 256,
    "pronunciation_embed_dim": 16, "encoder_hash_byte_group_vocab": 256, "hidden_size_global": 64,
    "linear_head_dim": 16, "linear_num_heads": 4, "num_experts_per_token": 2, "num_expert_group": 1,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16, "sliding_window_size": 16,
    "moe_topk": 2, "zero_expert_num": 2, "ext_pw_out_channel": 64, "depthwise_separable_out_channel": 64,
    "nemo_conv_channels": 64, "embedding_dim": 64, "moe_k": 2, "moe_layer_end_index": 3,
    "num_blocks": 4, "n_shared_experts": 1,
}
# Vision-language families whose language model is edited (the list); built with their own class.
VLM_TYPES = ("gemma3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3", "llama4", "idefics3", "smolvlm",
             "paligemma")
# Qwen4-Exp's default leaves its sparse-attention indexer unset, and sizes its n-gram tables in millions.
_QWEN4_EXP = {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
              "indexer_compress_ratio": 2, "ngram_vocab_size_base": 256, "hc_lowrank": 16, "ple_embed_dim": 64,
              "split_ngram_parts": 4, "make_ngram_vocab_size_divisible_by": 8}
# Settings a type's own validator ties to others, or its default leaves unset, where no size key says so.
OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen4_exp_text": _QWEN4_EXP, "qwen4_exp": {"text_config": _QWEN4_EXP},
    "zaya": {"num_experts_per_tok": 1}, "reformer": {"is_decoder": True, "axial_pos_embds": False},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "cohere_compass_text": {"rope_parameters": {kind: {"rope_type": "default", "rope_theta": 10000.0}
                                                for kind in ("full_attention", "sliding_attention")}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # its default has none
    # Dory's config.json counts each layer's attention and MLP as two blocks.
    "dory": {"num_hidden_layers": 8, "n_input_layers": 2, "n_recurrent_layers": 4, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "sliding_attention", "mlp", "sliding_attention", "mlp",
                             "full_attention", "mlp"]},
}
# Keys a default config leaves None that its model needs (derived from others, or unset in the default).
DERIVED_WHEN_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts", "n_group",
                     "topk_group", "n_shared_experts")
MAX_PARAMETERS = 3_000_000


@dataclass(frozen=True)
class ZooEntry:
    """One model type: its tiny config (None when none could be built) and why not; `forward_problem`
    where transformers builds and loads it but its own forward fails (weights can still be compared)."""

    model_type: str
    config: Any = None
    problem: str | None = None
    forward_problem: str | None = None


def causal_lm_types() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def shrunk(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict with every size key it has made small, sub-configs included."""
    out = dict(values)
    counts = [values[k] for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers") if isinstance(values.get(k), int)]
    layers, small = (counts[0] if counts else None), SIZES["num_hidden_layers"]
    keyed = values.get("per_layer_config")  # Gemma 4: overrides keyed by layer index ("05")
    keyed = keyed if isinstance(keyed, dict) and keyed and all(str(k).isdigit() for k in keyed) else None
    # The tiny model keeps a window of the layers; with keyed overrides, one that holds the first of them.
    start = max(0, min(int(k) for k in keyed) - small + 1) if keyed else 0
    for key, value in values.items():
        if key == "per_layer_config" and keyed:
            out[key] = {f"{int(k) - start:0{len(str(k))}d}": v for k, v in keyed.items() if start <= int(k) < start + small}
            continue
        if isinstance(value, dict) and "mrope_section" in value:  # multimodal rotary sections sum to head_dim / 2
            out[key] = value | {"mrope_section": [2, 3, 3]}
            continue
        per_layer = isinstance(value, list) or key == "hybrid_override_pattern"
        if per_layer and isinstance(layers, int) and layers > small and len(value) == layers:
            value = value[start:start + small]  # a per-layer list follows the layer count
            sized = key in SIZES and all(isinstance(v, int) for v in value)
            out[key] = [SIZES[key]] * small if sized else value  # per-layer sizes (Gemma 3n) shrink too
            continue
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            out[key] = shrunk(value)
        elif key == "num_kv_shared_layers" and isinstance(value, int) and isinstance(layers, int):
            out[key] = small if value >= layers else min(value, small // 2)  # all shared stays all shared
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool) and value:
            out[key] = SIZES[key]
        elif key in DERIVED_WHEN_NONE and value is None:  # derived from sizes shrunk above, or left unset
            out[key] = SIZES[key]
        elif key in TOKEN_ID_KEYS and isinstance(value, int) and value >= SIZES["vocab_size"]:
            out[key] = 1
    if "_vl" in str(out.get("model_type")) and isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = out["rope_parameters"] | {"mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    if isinstance(out.get("expand"), int) and isinstance(out.get("head_dim"), int) and "num_heads" in out:
        out["num_heads"] = out.get("hidden_size", 64) * out["expand"] // out["head_dim"]  # Mamba-2's heads fill it
    if isinstance(out.get("attention_types"), list):  # GPT-Neo: [[pattern, repeats]] spans the layers
        out["attention_types"] = [[["global", "local"], SIZES["num_layers"] // 2]]
    if isinstance(out.get("qk_head_dim"), int) and "qk_nope_head_dim" in out:  # latent attention's query width
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    if "kv_lora_rank" in out and "num_key_value_heads" in out:  # latent attention: one key-value head per head
        out["num_key_value_heads"] = out.get("num_attention_heads", SIZES["num_attention_heads"])
    return out


def tiny_config(model_type: str) -> Any:
    """The model type's default config, shrunk; raises what transformers raises when it cannot be."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    values = shrunk(defaults)
    for key, value in OVERRIDES.get(model_type, {}).items():
        values[key] = values[key] | value if isinstance(value, dict) else value
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **values)


def auto_class(model_type: str) -> Any:
    """The auto class that builds a model type: the causal-LM one, else image-text-to-text (a VLM)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in VLM_TYPES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def build(config: Any, device: str = "cpu") -> Any:
    """The module of `config` with its random initialisation (seeded), or on the meta device."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        return auto_class(config.model_type).from_config(config)


def zoo(model_types: list[str] | None = None) -> Iterator[ZooEntry]:
    """A tiny config for each causal-LM model type, or the reason it has none."""
    from surgery.evaluation.models import quiet_transformers

    with quiet_transformers():
        for model_type in model_types or causal_lm_types():
            try:
                config = tiny_config(model_type)
                parameters = sum(p.numel() for p in build(config, "meta").parameters())
                model = build(config).eval() if parameters <= MAX_PARAMETERS else None
            except Exception as e:  # each type's own reason, reported in the architecture table
                yield ZooEntry(model_type, problem=_reason(e))
                continue
            if model is None:
                yield ZooEntry(model_type, problem=f"smallest config found has {parameters:,} parameters")
                continue
            try:
                logits_of(model, model.get_input_embeddings().weight.shape[0])  # it runs as configured
            except Exception as e:  # transformers' own forward fails: only the weights can be compared
                yield ZooEntry(model_type, config, forward_problem=_reason(e))
                continue
            yield ZooEntry(model_type, config)


def _reason(error: Exception) -> str:
    """The error in one line: its first line, and the next where the first only introduces it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    if isinstance(error, ImportError) and " requires the " in text:  # which one is missing depends on the machine
        text = text.split(" requires the ")[0] + " requires a library that is not installed here"
    return f"{type(error).__name__}: {text[:200]}"


def logits_of(model: Any, vocab: int) -> Any:
    """The model's logits on a fixed token sequence (no cache, so a layer's slot does not matter)."""
    import torch

    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def save_tiny(config: Any, folder: Path) -> Path:
    """Write a tiny random model of `config` to `folder` as transformers saves it."""
    from surgery.evaluation.models import quiet_transformers

    with quiet_transformers():
        build(config).save_pretrained(folder)
    return folder


def zoo_folder() -> Path:
    """Where the tiny checkpoints are cached, by transformers version (each version builds its own)."""
    import transformers

    from surgery.demo_models.cache import cache_root

    return cache_root() / f"zoo-transformers-{transformers.__version__}"


def tiny_checkpoint(entry: ZooEntry) -> Path:
    """The cached tiny checkpoint of a model type, built on first use (written aside, then renamed)."""
    import hashlib
    import shutil
    import uuid

    digest = hashlib.sha256(entry.config.to_json_string().encode()).hexdigest()[:10]
    folder = zoo_folder() / f"{entry.model_type}-{digest}"  # a changed tiny config builds a new one
    if not (folder / "config.json").is_file():
        staging = folder.with_name(f".{entry.model_type}.{uuid.uuid4().hex}")
        save_tiny(entry.config, staging)
        try:
            staging.rename(folder)
        except OSError:  # built by another process meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def zoo_types() -> list[str]:
    """The model types the architecture tests cover: every causal-LM type, and the VLM families."""
    return sorted({*causal_lm_types(), *VLM_TYPES})
