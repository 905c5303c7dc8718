"""Load a trit-plane checkpoint (formats/trit_planes.py) for scoring: its dense model, each matrix
a1 t1 + a2 t2 in the source dtype as the dense format writes it, loaded by transformers from that state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.checkpoint.blocks import torch_dtype
from surgery.checkpoint.reader import Checkpoint
from surgery.evaluation.models import require_causal_lm
from surgery.formats.trit_planes import trit_view
from surgery.recipe.stream import RecipeStreamer


def load_trit_planes(folder: Path, device: str, dtype: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    view = trit_view(Checkpoint.open(folder), folder.name)
    config = view.config()
    require_causal_lm(config, folder)
    streamer = RecipeStreamer()
    try:  # each tensor rounded to its stored dtype, as the dense output stores it
        state = {name: streamer.whole(r).to(torch_dtype(r.dtype)) for name, r in view.tensors().items()}
    finally:
        streamer.close()
    settings = AutoConfig.for_model(**config)
    model_class = AutoModelForCausalLM._model_mapping[type(settings)]  # the auto class wants a folder
    model = model_class.from_pretrained(None, config=settings, state_dict=state, dtype=dtype)
    return model.to(device).eval()
