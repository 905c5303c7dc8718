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
from surgery.formats.views import cap_refusal

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

    def placement(self) -> str:
        """Where it runs, for logs: the device, and what a memory cap keeps off it."""
        placed = {str(where) for where in (getattr(self.model, "hf_device_map", None) or {}).values()}
        away = sorted(where for where in placed if where in ("cpu", "disk") and where != self.device)
        if not away:
            return self.device
        return f"{self.device}, under the memory cap: the rest waits {' and '.join(_WAITS[w] for w in away)}"


_WAITS = {"cpu": "in CPU memory", "disk": "on disk"}


def _load_standard(folder: Path, device: str, dtype: Any, max_memory: int | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    config = read_config(folder)
    refuse_remote_code(config, folder)
    require_causal_lm(config, folder)
    if not any(folder.glob("*.safetensors")):
        Checkpoint.open(folder)  # raises the reason in one line: pickle weights only, or none
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "compressed-tensors" and importlib.util.find_spec("compressed_tensors") is None:
        raise SurgeryError(f"{folder} holds packed compressed-tensors weights; pip install 'surgery[quant]' to load them")
    placement = {} if max_memory is None else capped_placement(device, max_memory)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, output_loading_info=True, trust_remote_code=False, use_safetensors=True, **placement
        )
    except (ValueError, RuntimeError) as e:  # RuntimeError: a tensor whose shape the config does not give
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"{folder}: transformers cannot load it as a causal LM ({reason})") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SurgeryError(f"{folder} lacks weights the causal LM needs ({', '.join(missing[:3])}); is it a causal LM?")
    if placement:
        return model.eval()  # accelerate's hooks bring each layer's weights in from where they wait
    return apply_lora_adapter(model.to(device), folder).eval()


# (recognise by config.json, load) pairs, most specific first.
LOADERS: list[tuple[Callable[[dict[str, Any]], bool], Callable[[Path, str, Any], Any]]] = [
    (is_ensemble, lambda folder, device, dtype: load_ensemble(folder, device, dtype, load_model)),
    (is_compact, load_compact),
    (is_trit_planes, load_trit_planes),
    (lambda config: True, _load_standard),
]


def load_model(folder: Path, device: str, dtype: Any, max_memory: int | None = None) -> Any:
    """The module of any model kind surgery writes, by the first loader in `LOADERS` that recognises it;
    with `max_memory`, a standard checkpoint keeps at most that many bytes of weights on the device
    (the rest wait in CPU memory, or on disk when the device is the CPU)."""
    if not (folder / "config.json").is_file():
        raise SurgeryError(f"{folder}: not a model surgery can load (no config.json)")
    config = read_config(folder)
    load = next(load for recognise, load in LOADERS if recognise(config))
    if max_memory is None:
        return load(folder, device, dtype)
    check_cappable(folder, config)
    return _load_standard(folder, device, dtype, max_memory)


def check_cappable(folder: Path, config: dict[str, Any]) -> None:
    """A memory cap loads a standard checkpoint as transformers does: anything else is refused in one line."""
    refusal = cap_refusal(config, str(folder))
    if refusal is not None:
        raise SurgeryError(refusal)
    if (folder / "adapter_config.json").exists():
        raise SurgeryError(f"{folder}: a memory cap cannot apply the LoRA adapter beside the model; score it without "
                           "--max-memory, or merge the adapter (heal with write: merged)")


def capped_placement(device: str, max_memory: int) -> dict[str, Any]:
    """from_pretrained's arguments that keep at most `max_memory` bytes of weights on `device`: accelerate's
    device map, the rest in CPU memory (from a GPU) or on disk, in a temporary folder removed at exit."""
    import atexit
    import shutil
    import tempfile

    if importlib.util.find_spec("accelerate") is None:
        raise SurgeryError("scoring under a memory cap needs accelerate: pip install 'surgery[offload]'")
    offload = Path(tempfile.mkdtemp(prefix="surgery-offload-"))
    atexit.register(shutil.rmtree, offload, True)
    where: int | str = "cpu" if device == "cpu" else int(device.partition(":")[2] or 0)
    limits: dict[int | str, int] = {where: max_memory} if where == "cpu" else {where: max_memory, "cpu": _ram()}
    return {"device_map": "auto", "max_memory": limits, "offload_folder": str(offload)}


def _ram() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_for_eval(path: str | Path, device: str = "auto", dtype: str = "auto",
                  max_memory: int | None = None) -> LoadedModel:
    """Load any model surgery writes, ready to score or generate with.

    Args: `path` is the model folder; `device` is auto (CUDA when present), cpu, cuda or cuda:N;
    `dtype` is auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16 or float16; `max_memory` caps
    the bytes of weights held on the device (a model larger than the device scores layer by layer).
    Returns a LoadedModel: `.model` maps input_ids to logits, `.tokenizer` is its tokenizer.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise SurgeryError(f"model folder {folder} does not exist")
    check_tokenizer(folder)
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    with quiet_transformers():
        model = load_model(folder, resolved_device, torch_dtype, max_memory)
    tokenizer = load_tokenizer(folder)
    parameters = sum(p.numel() for p in model.parameters())
    on_disk = getattr(model, "bytes_on_disk", None) or sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return LoadedModel(model, tokenizer, resolved_device, str(torch_dtype).removeprefix("torch."), parameters, on_disk)


def check_tokenizer(folder: Path) -> None:
    """A folder's tokenizer files, there and regular (transformers would block reading a FIFO), or one line."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SurgeryError(f"{folder} has no tokenizer files (tokenizer.json, ...); copy the tokenizer of its source model in")
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "added_tokens.json"):
        if (folder / name).exists() or (folder / name).is_symlink():
            regular_file(folder / name, "a tokenizer file must be a regular file: copy the file itself in")


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, checked first (check_tokenizer)."""
    from transformers import AutoTokenizer

    check_tokenizer(folder)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
