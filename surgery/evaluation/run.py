"""Score a model (and its reference, on the same tokens) over one or more texts."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.checkpoint.reader import read_config
from surgery.errors import SurgeryError
from surgery.evaluation.data import EvalText, first_tokens, load_text
from surgery.evaluation.harness import check_tasks, run_tasks
from surgery.evaluation.loading import LoadedModel, check_cappable, load_for_eval
from surgery.evaluation.models import context_length
from surgery.evaluation.perplexity import PerplexityResult, perplexity

DEFAULT_WINDOW = 2048
Phase = Callable[[str], AbstractContextManager[object]]  # what a long step is doing, while it does it


@dataclass(frozen=True)
class EvalSettings:
    """How to score; the same fields as a plan's `evaluate:` section."""

    data: tuple[str, ...] = ("builtin",)
    max_tokens: int = 8192
    window: int | None = None
    stride: int | None = None
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    tasks: tuple[str, ...] = ()  # lm-eval task names or task YAML files
    max_memory: int | None = None  # bytes of weights on the device; the rest wait in CPU memory or on disk


@dataclass
class DatasetScore:
    data: str
    perplexity: float
    tokens: int
    tokens_per_second: float
    base_perplexity: float | None = None
    delta: float | None = None


@dataclass
class EvalReport:
    """What `surgery eval --json` prints and `surgery.json` records."""

    model: str
    device: str
    dtype: str
    parameters: int
    bytes_on_disk: int
    window: int
    stride: int
    perplexity: float
    tokens: int
    tokens_per_second: float
    datasets: list[DatasetScore] = field(default_factory=list)
    base: str | None = None
    base_perplexity: float | None = None
    base_tokens_per_second: float | None = None
    delta: float | None = None
    tasks: dict[str, dict[str, float]] | None = None
    base_tasks: dict[str, dict[str, float]] | None = None
    max_memory: int | None = None  # the memory cap it was scored under, bytes (tokens/s pays for it)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def evaluate(model_path: str | Path, settings: EvalSettings = EvalSettings(),
             compare: str | Path | None = None, phase: Phase = nullcontext) -> EvalReport:
    """Perplexity and throughput of a model on each text; with `compare`, its reference too, on the same tokens.

    Args: `model_path` is any folder surgery can load (standard, compact recursive, ensemble, packed);
    `settings` says what to score and where (texts, tokens, window, device, dtype, lm-eval tasks);
    `compare` is the reference model; `phase(text)` is entered while each model is scored (the CLI
    shows it on a terminal). Returns an EvalReport; raises SurgeryError (e.g. when the two
    tokenize the text differently).
    """
    texts = [load_text(spec) for spec in settings.data]
    if settings.tasks:
        check_tasks(list(settings.tasks))
    if settings.max_memory is not None and compare is not None and (Path(compare) / "config.json").is_file():
        check_cappable(Path(compare), read_config(Path(compare)))  # refused before the model loads, not after
    loaded = load_for_eval(model_path, settings.device, settings.dtype, settings.max_memory)
    contexts = {model_path: context_length(loaded.model.config)}
    if compare is not None:  # both are scored on the same windows: the shorter context bounds them
        contexts[compare] = context_length(read_config(Path(compare)))
    known = {m: c for m, c in contexts.items() if c}
    bound = min(known, key=known.__getitem__, default=None)  # the model whose context is shortest
    context = known.get(bound)
    if settings.window is not None and context is not None and settings.window > context:
        raise SurgeryError(f"--window {settings.window} is longer than {bound}'s context of {context} tokens "
                           f"(its config's position limit); give --window {context} or less")
    window = settings.window or min(DEFAULT_WINDOW, context or DEFAULT_WINDOW)
    stride = settings.stride or max(1, window // 2)
    token_ids = [_tokenize(loaded, text, settings.max_tokens) for text in texts]
    what = f"{sum(len(ids) for ids in token_ids):,} tokens of {', '.join(t.name for t in texts)} ({loaded.device})"
    with phase(f"scoring {model_path} on {what}"):
        scores, report_tasks = _score(loaded, token_ids, window, stride, settings)
    report = _report(str(model_path), loaded, window, stride, texts, scores)
    report.tasks, report.max_memory = report_tasks, settings.max_memory
    if compare is not None:
        reference = load_for_eval(compare, settings.device, settings.dtype, settings.max_memory)
        for text, ids in zip(texts, token_ids):
            if not _same_tokens(reference, text, ids, settings.max_tokens):
                raise SurgeryError(
                    f"{compare} tokenizes {text.name} differently from {model_path}; "
                    "perplexities on different tokens are not comparable"
                )
        with phase(f"scoring the reference {compare} on the same tokens"):
            base_scores, report.base_tasks = _score(reference, token_ids, window, stride, settings)
        report.base = str(compare)
        report.base_perplexity = _pooled(base_scores)
        report.base_tokens_per_second = _throughput(base_scores)
        report.delta = report.perplexity - report.base_perplexity
        for dataset, base in zip(report.datasets, base_scores):
            dataset.base_perplexity = base.perplexity
            dataset.delta = dataset.perplexity - base.perplexity
    return report


def _score(
    loaded: LoadedModel, token_ids: list[Any], window: int, stride: int, settings: EvalSettings
) -> tuple[list[PerplexityResult], dict[str, dict[str, float]] | None]:
    """Perplexity on each text (and lm-eval tasks when asked), then free the model."""
    scores = [perplexity(loaded.model, ids, window, stride, settings.batch_size) for ids in token_ids]
    tasks = run_tasks(loaded.model, loaded.tokenizer, list(settings.tasks), settings.batch_size) if settings.tasks else None
    _release(loaded)
    return scores, tasks


def _report(
    model: str, loaded: LoadedModel, window: int, stride: int, texts: list[EvalText], scores: list[PerplexityResult]
) -> EvalReport:
    return EvalReport(
        model=model, device=loaded.device, dtype=loaded.dtype, parameters=loaded.parameters,
        bytes_on_disk=loaded.bytes_on_disk, window=window, stride=stride,
        perplexity=_pooled(scores), tokens=sum(s.tokens for s in scores), tokens_per_second=_throughput(scores),
        datasets=[DatasetScore(t.name, s.perplexity, s.tokens, s.tokens_per_second) for t, s in zip(texts, scores)],
    )


def _pooled(scores: list[PerplexityResult]) -> float:
    """Perplexity over all scored tokens of all texts together."""
    return math.exp(sum(s.mean_nll * s.tokens for s in scores) / sum(s.tokens for s in scores))


def _throughput(scores: list[PerplexityResult]) -> float:
    return sum(s.forward_tokens for s in scores) / max(sum(s.seconds for s in scores), 1e-9)


def _tokenize(loaded: LoadedModel, text: EvalText, max_tokens: int) -> Any:
    """The first `max_tokens` tokens of the text, tokenized whole with the tokenizer's defaults."""
    import torch

    ids = first_tokens(loaded.tokenizer, text.text, max_tokens)
    if len(ids) < 2:
        raise SurgeryError(f"{text.name}: {len(ids)} token(s) after tokenizing; perplexity needs at least 2")
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    if max(ids) >= vocab:
        raise SurgeryError(f"the tokenizer produces id {max(ids)} but the model's vocabulary has {vocab} entries")
    return torch.tensor(ids, dtype=torch.long)


def _same_tokens(reference: LoadedModel, text: EvalText, ids: Any, max_tokens: int) -> bool:
    return first_tokens(reference.tokenizer, text.text, max_tokens) == ids.tolist()


def _release(loaded: LoadedModel) -> None:
    """Free a model before loading the next, so two never share the accelerator's memory."""
    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
