"""What every loader and fit needs of a transformers model: its dtype, its layers, its head, quiet logs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def require_causal_lm(config: dict[str, Any], where: str | Path) -> None:
    """Perplexity needs a language-model head; an encoder would get a random one from transformers."""
    architectures = config.get("architectures") or []
    if architectures and not any("CausalLM" in a or "LMHead" in a for a in architectures):
        raise SurgeryError(f"{where} is a {architectures[0]} (no language-model head): perplexity needs a causal LM")


def refuse_remote_code(config: dict[str, Any], folder: Path) -> None:
    """A model whose architecture exists only as code shipped beside it (config `auto_map`) is refused:
    surgery never runs a checkpoint's own code."""
    from transformers import CONFIG_MAPPING

    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise SurgeryError(
            f"{folder}: its architecture ({config.get('model_type')!r}) is defined by code shipped with the model "
            "(config.json auto_map); surgery never runs remote code: use a transformers-native architecture"
        )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off: surgery reports what matters itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    placing = logging.getLogger("accelerate.big_modeling")  # "some parameters are on the meta device": by design
    level = placing.level
    placing.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        placing.setLevel(level)


def context_length(config: Any) -> int | None:
    """The longest sequence a model's config (object, or config.json dict) allows, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
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


def input_device(model: Any) -> Any:
    """Where a model's inputs go: its first parameter's device, or for a model accelerate placed under a memory
    cap (weights waiting on disk sit on the meta device) the device its hooks run it on."""
    import torch

    hook = getattr(model, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def checkpoint_names(model: Any) -> dict[str, str]:
    """Each parameter's name in the checkpoint, where that is one tensor: its own name, or the one
    transformers renames on loading (GPT-NeoX's head is stored as `embed_out`). A parameter it builds from
    several tensors (an MoE's fused experts) is left out."""
    parameters = dict(model.named_parameters())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before 5 loads every tensor under its own name
        return {name: name for name in parameters}
    saved = {id(tensor): name for name, tensor in revert_weight_conversion(model, dict(parameters)).items()}
    return {name: saved[id(p)] for name, p in parameters.items() if id(p) in saved}


def stored_parameters(model: Any, names: Iterable[str]) -> dict[str, str]:
    """Of the checkpoint's tensors `names`, in their order, those that are one parameter of `model`: each
    tensor's name -> its parameter's name (checkpoint_names, inverted)."""
    stored = {saved: name for name, saved in checkpoint_names(model).items()}
    return {name: stored[name] for name in names if name in stored}
