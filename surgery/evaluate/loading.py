"""Load any model surgery writes, for scoring: every model kind goes through `load_for_eval`.

Standard checkpoints load with plain transformers, compact recursive ones with shared parameters
(evaluate/compact.py), ensembles as one module over their members (evaluate/ensemble.py). Later
model kinds (packed quantized) register a loader in `LOADERS`, so `surgery eval` and plan `evaluate:` score
every kind with the same code.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.devices import resolve_device
from surgery.errors import SurgeryError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A model ready to score: a module mapping input_ids to logits, its tokenizer, where it runs."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str
    parameters: int
    bytes_on_disk: int


def resolve_dtype(dtype: str, device: str) -> Any:
    """auto: bfloat16 on a GPU that has it (else float16), float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise SurgeryError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _is_standard(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def require_causal_lm(config: dict[str, Any], where: str | Path) -> None:
    """Perplexity needs a language-model head; an encoder would get a random one from transformers."""
    architectures = config.get("architectures") or []
    if architectures and not any("CausalLM" in a or "LMHead" in a for a in architectures):
        raise SurgeryError(f"{where} is a {architectures[0]} (no language-model head): perplexity needs a causal LM")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off: surgery reports what matters itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def context_length(config: Any) -> int | None:
    """The longest sequence a model's config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def layer_modules(model: Any, prefix: str, count: int) -> Any:
    """The ModuleList of a loaded model's layers: at the checkpoint's prefix, else the one of that length."""
    import torch

    try:
        return model.get_submodule(prefix)
    except AttributeError:
        candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
        if len(candidates) != 1:
            raise SurgeryError(f"cannot find the {count} layers of {type(model).__name__}") from None
        return candidates[0]


def _load_standard(folder: Path, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    refuse_remote_code(config, folder)
    require_causal_lm(config, folder)
    if not any(folder.glob("*.safetensors")):
        from surgery.checkpoint.reader import Checkpoint

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
    return model.to(device).eval()


def refuse_remote_code(config: dict[str, Any], folder: Path) -> None:
    """A model whose architecture exists only as code shipped beside it (config `auto_map`) is refused:
    surgery never runs a checkpoint's own code."""
    from transformers import CONFIG_MAPPING

    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise SurgeryError(
            f"{folder}: its architecture ({config.get('model_type')!r}) is defined by code shipped with the model "
            "(config.json auto_map); surgery never runs remote code: use a transformers-native architecture"
        )


def _is_compact(folder: Path) -> bool:
    from surgery.evaluate.compact import is_compact_folder

    return is_compact_folder(folder)


def _load_compact(folder: Path, device: str, dtype: Any) -> Any:
    from surgery.evaluate.compact import load_compact

    return load_compact(folder, device, dtype)


def _is_ensemble(folder: Path) -> bool:
    from surgery.evaluate.ensemble import is_ensemble_folder

    return is_ensemble_folder(folder)


def _load_ensemble(folder: Path, device: str, dtype: Any) -> Any:
    from surgery.evaluate.ensemble import load_ensemble

    return load_ensemble(folder, device, dtype)


# (recognise, load) pairs, most specific first; a later issue adds quantized kinds.
LOADERS: list[tuple[Callable[[Path], bool], Callable[[Path, str, Any], Any]]] = [
    (_is_ensemble, _load_ensemble), (_is_compact, _load_compact), (_is_standard, _load_standard),
]


def load_model(folder: Path, device: str, dtype: Any) -> Any:
    """The module of any model kind surgery writes, by the first loader in `LOADERS` that recognises it."""
    for recognise, load in LOADERS:
        if recognise(folder):
            return load(folder, device, dtype)
    raise SurgeryError(f"{folder}: not a model surgery can load (no config.json)")


def load_for_eval(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model and tokenizer in `path`, on `device`, ready for `perplexity`."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise SurgeryError(f"model folder {folder} does not exist")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SurgeryError(f"{folder} has no tokenizer files (tokenizer.json, ...); copy the tokenizer of its source model in")
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    with quiet_transformers():
        model = load_model(folder, resolved_device, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    parameters = sum(p.numel() for p in model.parameters())
    on_disk = getattr(model, "bytes_on_disk", None) or sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return LoadedModel(model, tokenizer, resolved_device, str(torch_dtype).removeprefix("torch."), parameters, on_disk)
