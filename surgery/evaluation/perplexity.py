"""Perplexity with a sliding window: the standard strided method, each token scored exactly once.

Windows of `window` tokens start every `stride` tokens; a window scores only the tokens the
previous one did not reach, so each token after the first is scored once, with up to
`window - stride` tokens of context before its window's scored part.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from surgery.errors import SurgeryError
from surgery.evaluation.models import input_device


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    score_from: int  # first scored position; positions [score_from, end) are scored


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int  # scored tokens
    forward_tokens: int  # tokens run through the model (scored + context)
    seconds: float
    window: int
    stride: int

    @property
    def tokens_per_second(self) -> float:
        """Throughput: tokens through the model per second (context included)."""
        return self.forward_tokens / self.seconds if self.seconds > 0 else float("inf")


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows covering `n_tokens` tokens; each position >= 1 is scored in exactly one of them."""
    if n_tokens < 2:
        raise SurgeryError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    if window < 2 or not 1 <= stride <= window:
        raise SurgeryError(f"window {window} and stride {stride}: need window >= 2 and 1 <= stride <= window")
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        score_from = max(previous_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(model: Any, ids: Any, window: int, stride: int, batch_size: int = 1) -> PerplexityResult:
    """Score token ids (1-D tensor) with a causal LM; windows of equal shape run as one batch."""
    import torch

    device = input_device(model)
    windows = plan_windows(len(ids), window, stride)
    groups: dict[tuple[int, int], list[Window]] = defaultdict(list)
    for w in windows:
        groups[(w.end - w.begin, w.end - w.score_from)].append(w)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    total_nll = torch.zeros((), dtype=torch.float64, device=device)  # summed where it is made: no host sync per row
    scored, forward_tokens = 0, 0
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for (length, n_scored), members in groups.items():
            for first in range(0, len(members), batch_size):
                batch = members[first : first + batch_size]
                inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
                # logits at positions [score_from - 1, end - 1) predict the scored tokens
                if keeps_logits:
                    logits = model(input_ids=inputs, logits_to_keep=n_scored + 1, use_cache=False).logits[:, :-1]
                else:
                    logits = model(input_ids=inputs).logits[:, length - n_scored - 1 : -1]
                targets = inputs[:, length - n_scored :]
                for row in range(len(batch)):  # float32 loss one row at a time bounds memory
                    total_nll += torch.nn.functional.cross_entropy(logits[row].float(), targets[row], reduction="sum")
                scored += n_scored * len(batch)
                forward_tokens += length * len(batch)
    _synchronize(device)
    seconds = time.perf_counter() - start
    mean = float(total_nll) / scored
    return PerplexityResult(math.exp(mean), mean, scored, forward_tokens, seconds, window, stride)


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
