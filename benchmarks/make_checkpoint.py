"""A ~1.1B-parameter random Llama checkpoint with TinyLlama's shape, for benchmarks.

    python benchmarks/make_checkpoint.py OUT_DIR [--tokenizer]

bf16, 5 shards of about 500 MB, written shard by shard (bounded memory). With --tokenizer the
project's small built-in tokenizer is added so the checkpoint can be evaluated (its ids are a
subset of the 32000-entry vocabulary; the weights are random, so only speed is meaningful).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from surgery.checkpoint.reader import numel

TINYLLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
    hidden_act="silu", rope_theta=10000.0,
)
SHARD_BYTES = 500_000_000


def generate(folder: Path | str) -> Path:
    """Random bf16 weights with Llama names, written shard by shard (bounded memory)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file

    c = TINYLLAMA
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size + 2 * numel(shape) > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += 2 * numel(shape)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, staging / filename, metadata={"format": "pt"})
        weight_map |= {n: filename for n in names}
        del tensors
    total = sum(2 * numel(s) for s in shapes.values())
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (staging / "config.json").write_text(json.dumps(TINYLLAMA, indent=2))
    staging.rename(folder)
    return folder


def noisy_variant(base: Path, folder: Path | str, seed: int, scale: float = 0.002) -> Path:
    """A fine-tune stand-in: the base plus small seeded noise in every tensor, shard by shard."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import load_file, save_file

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(shard)
        noisy = {n: (t.float() + torch.randn(t.shape, generator=generator) * scale).to(t.dtype) for n, t in tensors.items()}
        save_file(noisy, staging / shard.name, metadata={"format": "pt"})
        del tensors, noisy
    for item in base.iterdir():
        if item.suffix != ".safetensors":
            shutil.copyfile(item, staging / item.name)
    staging.rename(folder)
    return folder


def add_tokenizer(folder: Path) -> None:
    from surgery.demo_models import cache_root, demo_model

    demo_model("tiny-llama")  # builds the shared tokenizer on first use
    for item in (cache_root() / "tokenizer").iterdir():
        shutil.copyfile(item, folder / item.name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", action="store_true", help="add the built-in tokenizer")
    args = parser.parse_args()
    folder = generate(args.out.resolve())
    if args.tokenizer and not (folder / "tokenizer.json").exists():
        add_tokenizer(folder)
    print(folder)
