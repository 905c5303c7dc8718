"""Learn aTLAS coefficients: AdamW on the causal-LM loss of given text, base and task vectors frozen.

As the paper's code: coefficients start equal (0 by default), the merged parameters are
theta_base + sum_t coef[t, block] * tau_t, gradients are clipped to norm 1, the learning rate
follows a cosine schedule. This is the one part of `surgery` that holds whole models in memory: the
base and every task vector, in float32, on the fit's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator

from surgery.errors import SurgeryError
from surgery.ops.fields import Strict
from surgery.recipe.stream import RecipeStreamer
from surgery.recipe.view import ModelView


class LearnSettings(Strict):
    """How aTLAS learns its coefficients: AdamW on the causal-LM loss of this text, base and task vectors frozen."""

    data: list[str] = Field(min_length=1, description="builtin:NAME or .txt/.jsonl files.")
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=0.05, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    max_tokens: int = Field(default=32768, ge=2, description="Train on the first N tokens of each text.")
    window: int = Field(default=128, ge=2, description="Tokens per training sequence.")
    init: float = Field(default=0.0, description="Every coefficient's starting value.")
    seed: int = 0
    device: str = "auto"

    @field_validator("data", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def learn_coefficients(
    base: ModelView, models: list[ModelView], block_of: dict[str, str], blocks: list[str],
    settings: LearnSettings, log: Callable[[str], None],
) -> list[list[float]]:
    """Coefficients[t][b] for each model t and block b (blocks no learnable tensor falls in keep `init`)."""
    import torch
    from torch.func import functional_call

    from surgery.evaluation.loading import load_for_eval

    loaded = load_for_eval(base.source.path, settings.device, "float32")
    model, device = loaded.model, loaded.device
    model.requires_grad_(False)
    parameters = dict(model.named_parameters())
    learnable = [name for name in block_of if name in parameters]
    if not learnable:
        raise SurgeryError(f"atlas: none of {base.label}'s tensors is a parameter of the transformers model; cannot learn")
    index = {b: i for i, b in enumerate(blocks)}
    block_index = torch.tensor([index[block_of[name]] for name in learnable], device=device)
    base_values = [parameters[name].detach() for name in learnable]
    task_vectors = []
    streamer = RecipeStreamer()  # each file opened once, read straight into float32
    try:
        for view in models:
            tensors = view.tensors()
            task_vectors.append([streamer.whole(tensors[name]).to(device).sub_(base_value)
                                 for name, base_value in zip(learnable, base_values)])
    finally:
        streamer.close()

    sequences = _training_sequences(loaded.tokenizer, settings)
    coefficients = torch.full((len(models), len(blocks)), settings.init, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([coefficients], lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    log(f"atlas: learning {coefficients.numel()} coefficients on {sequences.numel():,} tokens, {settings.steps} steps")
    for step in range(settings.steps):
        batch = sequences[torch.randint(len(sequences), (settings.batch_size,), generator=generator)].to(device)
        per_tensor = coefficients[:, block_index]  # (models, tensors)
        merged = {
            name: base_value + sum(per_tensor[t, i] * task_vectors[t][i] for t in range(len(models)))
            for i, (name, base_value) in enumerate(zip(learnable, base_values))
        }
        loss = functional_call(model, merged, args=(), kwargs={"input_ids": batch, "labels": batch, "use_cache": False}).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([coefficients], 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, settings.steps // 5) == 0 or step == settings.steps - 1:
            log(f"atlas: step {step + 1}/{settings.steps} loss {loss.item():.4f}")
    return coefficients.detach().cpu().tolist()


def _training_sequences(tokenizer, settings: LearnSettings):
    """Windows of `window` tokens cut from the first `max_tokens` tokens of each text."""
    import torch

    from surgery.evaluation.data import first_tokens, load_text

    windows = []
    for spec in settings.data:
        ids = first_tokens(tokenizer, load_text(spec).text, settings.max_tokens)
        usable = len(ids) // settings.window * settings.window
        if usable == 0:
            raise SurgeryError(f"atlas.learn: {spec} has {len(ids)} tokens, fewer than one window of {settings.window}")
        windows.append(torch.tensor(ids[:usable]).view(-1, settings.window))
    return torch.cat(windows)
