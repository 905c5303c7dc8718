"""Load any model surgery writes, for scoring: every model kind goes through `load_for_eval`.

Standard checkpoints load with plain transformers, compact recursive ones with shared parameters
(evaluation/recursive_model.py), ensembles as one module over their members (evaluation/ensemble_model.py),
trit-planes as their dense model (evaluation/trit_model.py). Each kind registers a loader in `LOADERS`, so
`surgery eval` and plan `evaluate:` score every kind with the same code.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.reader import Checkpoint, read_config, regular_file
from surgery.devices import resolve_device
from surgery.errors import SurgeryError
from surgery.evaluation.ensemble_model import load_ensemble
from surgery.evaluation.lora_adapter import apply_lora_adapter
from surgery.evaluation.models import quiet_transformers, refuse_remote_code, require_causal_lm, resolve_dtype
from surgery.evaluation.recursive_model import load_compact
from surgery.evaluation.trit_model import load_trit_planes
from surgery.formats.ensemble_folder import is_ensemble
from surgery.formats.recursive import is_compact
from surgery.formats.trit_planes import is_trit_planes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")


@dataclass
class LoadedModel:
    """A model ready to score: a module mapping input_ids to logits, its tokenizer, where it runs."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str
    parameters: int
    bytes_on_disk: int


def _load_standard(folder: Path, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    config = read_config(folder)
    refuse_remote_code(config, folder)
    require_causal_lm(config, folder)
    if not any(folder.glob("*.safetensors")):
        Checkpoint.open(folder)  # raises the reason in one line: pickle weights only, or none
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "compressed-tensors" and importlib.util.find_spec("compressed_tensors") is None:
        raise SurgeryError(f"{folder} holds packed compressed-tensors weights; pip install 'surgery[quant]' to load them")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, output_loading_info=True, trust_remote_code=False, use_safetensors=True
        )
    except ValueError as e:
        raise SurgeryError(f"{folder}: transformers cannot load it as a causal LM ({e})") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SurgeryError(f"{folder} lacks weights the causal LM needs ({', '.join(missing[:3])}); is it a causal LM?")
    return apply_lora_adapter(model.to(device), folder).eval()


# (recognise by config.json, load) pairs, most specific first.
LOADERS: list[tuple[Callable[[dict[str, Any]], bool], Callable[[Path, str, Any], Any]]] = [
    (is_ensemble, lambda folder, device, dtype: load_ensemble(folder, device, dtype, load_model)),
    (is_compact, load_compact),
    (is_trit_planes, load_trit_planes),
    (lambda config: True, _load_standard),
]


def load_model(folder: Path, device: str, dtype: Any) -> Any:
    """The module of any model kind surgery writes, by the first loader in `LOADERS` that recognises it."""
    if not (folder / "config.json").is_file():
        raise SurgeryError(f"{folder}: not a model surgery can load (no config.json)")
    config = read_config(folder)
    load = next(load for recognise, load in LOADERS if recognise(config))
    return load(folder, device, dtype)


def load_for_eval(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load any model surgery writes, ready to score or generate with.

    Args: `path` is the model folder; `device` is auto (CUDA when present), cpu, cuda or cuda:N;
    `dtype` is auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16 or float16.
    Returns a LoadedModel: `.model` maps input_ids to logits, `.tokenizer` is its tokenizer.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise SurgeryError(f"model folder {folder} does not exist")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SurgeryError(f"{folder} has no tokenizer files (tokenizer.json, ...); copy the tokenizer of its source model in")
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "added_tokens.json"):
        if (folder / name).exists() or (folder / name).is_symlink():  # transformers would block on a FIFO
            regular_file(folder / name, "a tokenizer file must be a regular file: copy the file itself in")
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    with quiet_transformers():
        model = load_model(folder, resolved_device, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    parameters = sum(p.numel() for p in model.parameters())
    on_disk = getattr(model, "bytes_on_disk", None) or sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return LoadedModel(model, tokenizer, resolved_device, str(torch_dtype).removeprefix("torch."), parameters, on_disk)
