"""What the structure check costs on the largest configs: the output model built on the meta device
and the written tensors put through transformers' loading, for a Llama-3-70B-sized config and
DeepSeek-V3's own (671B, 256 experts stored one by one: 45k tensors). No weights are needed.

    python benchmarks/bench_verify.py

A plan that moves layers runs the check twice (the source, then the output); the source's build is
kept for the process, so `check` then `apply` in one process pays it once.
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.architecture.structure import build_on_meta, config_object, loading_problems, model_class  # noqa: E402
from surgery.evaluation.models import quiet_transformers  # noqa: E402

LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256}


def checkpoint_shapes(model, config: dict) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a checkpoint of this model holds (experts one by one, as published)."""
    shapes = {}
    experts, hidden, width = config.get("n_routed_experts"), config["hidden_size"], config.get("moe_intermediate_size")
    for name, tensor in model.state_dict().items():
        if ".mlp.experts." in name:
            layer = name.split(".mlp.experts.")[0]
            for e in range(experts):
                shapes |= {f"{layer}.mlp.experts.{e}.gate_proj.weight": (width, hidden),
                           f"{layer}.mlp.experts.{e}.up_proj.weight": (width, hidden),
                           f"{layer}.mlp.experts.{e}.down_proj.weight": (hidden, width)}
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes


def measure(name: str, config: dict) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(**config).to_dict()
    with quiet_transformers():
        start = time.perf_counter()
        model = build_on_meta(model_class(config), config_object(config))
        built = time.perf_counter() - start
        shapes = checkpoint_shapes(model, config)
        start = time.perf_counter()
        problems = loading_problems(model, shapes)
        loaded = time.perf_counter() - start
    print(f"| {name} | {len(shapes):,} | {built:.1f} s | {loaded:.1f} s | {len(problems)} |")


def main() -> None:
    warnings.filterwarnings("ignore")
    print("| config | tensors | build on meta | loading check | problems |\n|---|---|---|---|---|")
    measure("Llama-3-70B size", LLAMA_70B)
    measure("DeepSeek-V3 (671B)", {"model_type": "deepseek_v3"})
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
