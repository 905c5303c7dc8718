"""How closely a model follows a reference model's next-token distribution on the same tokens: the mean
KL divergence KL(reference || model) per token, and how often the two models' most likely next tokens
agree. Perplexity moves little when a quantizer shifts probability between likely tokens; these show it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgery.evaluation.models import input_device

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Agreement:
    kl: float  # nats per token
    top1: float  # fraction of tokens
    tokens: int


def next_token_agreement(reference: Any, model: Any, rows: torch.Tensor) -> Agreement:
    """Both models on each row (one row in memory at a time), float64 sums over every position."""
    import torch

    kl, agree, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for row in rows:
            p = log_probs(reference, row)
            q = log_probs(model, row).to(p.device)
            kl += kl_sum(p, q)
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            tokens += p.shape[0]
    return Agreement(kl / tokens, agree / tokens, tokens)


def log_probs(model: Any, row: torch.Tensor) -> torch.Tensor:
    """The model's next-token log-probabilities (float64) at every position of one row of token ids."""
    ids = row.unsqueeze(0).to(input_device(model))
    return model(input_ids=ids, use_cache=False).logits[0].double().log_softmax(-1)


def kl_sum(p: torch.Tensor, q: torch.Tensor) -> float:
    """Sum over positions of KL(p || q), both given as log-probabilities."""
    return float((p.exp() * (p - q)).sum())
