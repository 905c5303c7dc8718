"""Learn aTLAS coefficients: AdamW on the causal-LM loss of given text, base and task vectors frozen.

As the paper's code: coefficients start equal (0 by default), the merged parameters are
theta_base + sum_t coef[t, block] * tau_t, gradients are clipped to norm 1, the learning rate
follows a cosine schedule. It holds the base and every task vector, in float32, on the fit's device,
unless a memory cap is smaller: then each tensor is read from the checkpoints when the forward uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from surgery.checkpoint.reader import numel
from surgery.errors import SurgeryError
from surgery.formatting import human_bytes
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
    settings: LearnSettings, log: Callable[[str], None], max_memory: int | None = None,
) -> list[list[float]]:
    """Coefficients[t][b] for each model t and block b (blocks no learnable tensor falls in keep `init`).
    Under `max_memory` bytes that cannot hold the base and every task vector, the merged model is
    computed from the checkpoints as it runs (evaluation/merged_model.py); the steps are the same."""
    import torch

    from surgery.devices import resolve_device

    device = resolve_device(settings.device)
    held = (len(models) + 1) * 4 * sum(numel(r.shape) for n, r in base.tensors().items() if n in block_of)
    fit = _InMemory(base, models, block_of, device, log) if max_memory is None or held <= max_memory \
        else _Streamed(base, models, block_of, device, max_memory, held, log)
    try:
        index = {b: i for i, b in enumerate(blocks)}
        block_index = torch.tensor([index[block_of[name]] for name in fit.learnable], device=device)
        sequences = _training_sequences(fit.tokenizer, settings)
        coefficients = torch.full((len(models), len(blocks)), settings.init, device=device, requires_grad=True)
        optimizer = torch.optim.AdamW([coefficients], lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
        generator = torch.Generator().manual_seed(settings.seed)
        log(f"atlas: learning {coefficients.numel()} coefficients on {sequences.numel():,} tokens, {settings.steps} steps")
        for step in range(settings.steps):
            batch = sequences[torch.randint(len(sequences), (settings.batch_size,), generator=generator)].to(device)
            loss = fit.loss(coefficients[:, block_index], batch)  # per tensor: (models, tensors)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([coefficients], 1.0)
            optimizer.step()
            schedule.step()
            if step % max(1, settings.steps // 5) == 0 or step == settings.steps - 1:
                log(f"atlas: step {step + 1}/{settings.steps} loss {loss.item():.4f}")
    finally:
        fit.close()
    return coefficients.detach().cpu().tolist()


class _InMemory:
    """The base's module, with the base and every task vector held in float32 on the device."""

    def __init__(self, base: ModelView, models: list[ModelView], block_of: dict[str, str], device: str,
                 log: Callable[[str], None]) -> None:
        from surgery.evaluation.loading import load_for_eval

        loaded = load_for_eval(base.source.path, device, "float32")
        self.model, self.tokenizer = loaded.model.requires_grad_(False), loaded.tokenizer
        self.parameters = _learned_parameters(base, block_of, self.model, log)
        self.learnable = list(self.parameters)
        values = dict(self.model.named_parameters())
        self.base_values = [values[name].detach() for name in self.parameters.values()]
        self.task_vectors = []
        streamer = RecipeStreamer()  # each file opened once, read straight into float32
        try:
            for view in models:
                tensors = view.tensors()
                self.task_vectors.append([streamer.whole(tensors[name]).to(device).sub_(base_value)
                                          for name, base_value in zip(self.learnable, self.base_values)])
        finally:
            streamer.close()

    def loss(self, per_tensor: Any, batch: Any) -> Any:
        from torch.func import functional_call

        merged = {
            name: base_value + sum(per_tensor[t, i] * vectors[i] for t, vectors in enumerate(self.task_vectors))
            for i, (name, base_value) in enumerate(zip(self.parameters.values(), self.base_values))
        }
        return functional_call(self.model, merged, args=(),
                               kwargs={"input_ids": batch, "labels": batch, "use_cache": False}).loss

    def close(self) -> None:
        pass


class _Streamed:
    """The merged model computed from the checkpoints as it runs, each layer's forward run again for its backward."""

    def __init__(self, base: ModelView, models: list[ModelView], block_of: dict[str, str], device: str,
                 max_memory: int, held: int, log: Callable[[str], None]) -> None:
        from surgery.evaluation.loading import load_tokenizer
        from surgery.evaluation.merged_model import StreamedMerge
        from surgery.ops.heal_train import checkpoint_layers

        self.tokenizer = load_tokenizer(Path(base.source.path))
        self.merge = StreamedMerge(base, models, block_of, device)
        self.learnable = list(self.merge.parameters)
        checkpoint_layers(self.merge.model)
        log(f"atlas: the base and {len(models)} task vectors take {human_bytes(held)} in float32, more than the "
            f"memory cap ({human_bytes(max_memory)}): each tensor is read from the checkpoints when the forward "
            "uses it, each layer again for its backward")

    def loss(self, per_tensor: Any, batch: Any) -> Any:
        self.merge.coefficients.per_tensor = per_tensor
        return self.merge.model(input_ids=batch, labels=batch, use_cache=False).loss

    def close(self) -> None:
        self.merge.close()


def _learned_parameters(base: ModelView, block_of: dict[str, str], model: Any,
                        log: Callable[[str], None]) -> dict[str, str]:
    """The base's tensors that are parameters of transformers' `model`, each with its parameter's name
    (tensor order); the parameters it builds from several tensors are learned at the base's values, and said so."""
    from surgery.evaluation.models import stored_parameters

    learned = stored_parameters(model, block_of)
    if not learned:
        raise SurgeryError(f"atlas: none of {base.label}'s tensors is a parameter of the transformers model; cannot learn")
    fixed = sorted(set(dict(model.named_parameters())) - set(learned.values()))
    if fixed:
        log(f"atlas: {len(fixed)} parameters ({fixed[0]}, ...) are built by transformers from several stored tensors; "
            "they keep the base's values while the coefficients are learned")
    return learned


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
