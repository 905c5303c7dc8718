"""Load an ensemble folder as one module: `forward(input_ids) -> logits` runs every member on the
same input and combines their logits; `generate` decodes greedily with a KV cache per member."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint.reader import Checkpoint, read_config
from surgery.evaluation.models import context_length
from surgery.formats.ensemble_folder import EnsembleSpec, check_member_unchanged, member_name, read_spec

LoadModel = Callable[[Path, str, Any], Any]  # (folder, device, dtype) -> the module of any model kind


def load_ensemble(folder: Path, device: str, dtype: Any, load_model: LoadModel) -> Any:
    """Each member loaded once (a member by reference with `load_model`, whatever kind it is); on CUDA
    with several devices, member i goes to device i mod count."""
    spec = read_spec(folder, read_config(folder))
    count = torch.cuda.device_count() if device == "cuda" else 0  # an explicit cuda:N keeps every member there
    placements = [f"cuda:{i % count}" if count > 1 else device for i in range(len(spec.members))]
    members = [_load_member(folder, spec, i, placement, dtype, load_model) for i, placement in enumerate(placements)]
    model = EnsembleModel(members, spec.weights, spec.combine)
    folders = [folder] + [Path(m.path) for m in spec.members if m.path is not None]
    model.bytes_on_disk = sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))
    return model


def _load_member(folder: Path, spec: EnsembleSpec, index: int, device: str, dtype: Any, load_model: LoadModel) -> Any:
    member = spec.members[index]
    if member.path is not None:
        path = Path(member.path)
        check_member_unchanged(path, member.sha256)
        return load_model(path, device, dtype)
    return _load_copied(folder, spec, index, device, dtype)


def _load_copied(folder: Path, spec: EnsembleSpec, index: int, device: str, dtype: Any) -> Any:
    from safetensors import safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    checkpoint = Checkpoint.open(folder)
    prefix = member_name(index, "")
    wanted = {n.removeprefix(prefix): n for n in checkpoint.tensors if n.startswith(prefix)}
    wanted |= {alias.removeprefix(prefix): stored for alias, stored in spec.aliases.items() if alias.startswith(prefix)}
    state = {}
    for name, stored in wanted.items():
        info = checkpoint.tensors[stored]
        with safe_open(info.file, framework="pt") as f:
            state[name] = f.get_tensor(stored)
    config = AutoConfig.for_model(**spec.members[index].config)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model.to(device).eval()


@dataclass
class EnsembleOutput:
    logits: Any


class EnsembleModel(torch.nn.Module):
    """Weighted mean of the members' logits (combine: logits), or the log of the weighted mean of their
    probabilities (combine: probs), so that softmax of the output is the mixture."""

    def __init__(self, members: list[Any], weights: list[float], combine: str) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.weights = [w / sum(weights) for w in weights]
        self.combine = combine
        # scoring reads the context length here: the shortest member's
        self.config = min((m.config for m in members), key=lambda c: context_length(c) or 1 << 30)

    def get_output_embeddings(self) -> Any:
        return self.members[0].get_output_embeddings()

    def forward(self, input_ids: Any, logits_to_keep: int = 0, **kwargs: Any) -> EnsembleOutput:
        outputs = []
        for member in self.members:
            device = next(member.parameters()).device
            extra = {"logits_to_keep": logits_to_keep} if _accepts(member, "logits_to_keep") else {}
            logits = member(input_ids=input_ids.to(device), use_cache=False, **extra).logits
            if logits_to_keep and not extra:
                logits = logits[:, -logits_to_keep:]
            outputs.append(logits.float().to(input_ids.device))
        return EnsembleOutput(self.combined(outputs))

    def combined(self, logits: list[Any]) -> Any:
        if self.combine == "logits":
            return sum(w * l for w, l in zip(self.weights, logits))
        mixed = [math.log(w) + torch.log_softmax(l, dim=-1) for w, l in zip(self.weights, logits) if w > 0]
        return torch.logsumexp(torch.stack(mixed), dim=0)

    def generate(self, input_ids: Any, max_new_tokens: int = 20, **kwargs: Any) -> Any:
        """Greedy decoding: each member keeps its own KV cache; the next token is the argmax of the
        combined logits."""
        tokens, caches, step = input_ids, [None] * len(self.members), input_ids
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                logits = []
                for i, member in enumerate(self.members):
                    device = next(member.parameters()).device
                    key = "cache" if _accepts(member, "cache") else "past_key_values"  # transformers 5 renamed it
                    out = member(input_ids=step.to(device), use_cache=True, **{key: caches[i]})
                    caches[i] = out[key]
                    logits.append(out.logits[:, -1:].float().to(input_ids.device))
                step = self.combined(logits)[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, step], dim=1)
        return tokens


def _accepts(module: Any, argument: str) -> bool:
    return argument in inspect.signature(module.forward).parameters
