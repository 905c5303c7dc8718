"""Quality gates: limits a plan's output must meet against the model it is compared with, measured on the
evaluation text (perplexity increase; KL divergence and top-1 agreement of the next-token distributions),
so a merge or prune that outputs gibberish is said to have failed instead of being shipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.evaluation.run import EvalReport, EvalSettings

GATE_ROW = 512  # tokens per row for KL and agreement, where the evaluation's window does not say


class QualityGatesMissed(SurgeryError):
    """The output is written and kept, but misses the plan's limits: not the input's fault, and not pushed."""

    exit_code = 3


@dataclass(frozen=True)
class GateResult:
    limits: dict[str, float]
    measured: dict[str, float]
    missed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.missed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def measure_gates(limits: dict[str, float], report: EvalReport, output: Path, reference: Path,
                  settings: EvalSettings) -> GateResult:
    """Each limit's measure: the perplexity increase from the report (the same tokens for both); KL and top-1
    agreement from both models on the first tokens of the evaluation text, in rows of the window."""
    measured: dict[str, float] = {}
    if "perplexity_increase" in limits:
        assert report.base_perplexity is not None
        measured["perplexity_increase"] = report.perplexity / report.base_perplexity - 1
    if {"kl", "top1_agreement"} & set(limits):
        agreement = _agreement(output, reference, settings, min(settings.window or GATE_ROW, report.window))
        measured |= {"kl": agreement.kl, "top1_agreement": agreement.top1}
    missed = []
    if "perplexity_increase" in limits and not measured["perplexity_increase"] <= limits["perplexity_increase"]:
        got, limit = _distinct(measured["perplexity_increase"] * 100, limits["perplexity_increase"] * 100)
        missed.append(f"perplexity +{got}% > +{limit}%")
    if "kl" in limits and not measured["kl"] <= limits["kl"]:
        got, limit = _distinct(measured["kl"], limits["kl"])
        missed.append(f"KL {got} > {limit} nats/token")
    if "top1_agreement" in limits and not measured["top1_agreement"] >= limits["top1_agreement"]:
        got, limit = _distinct(measured["top1_agreement"] * 100, limits["top1_agreement"] * 100)
        missed.append(f"top-1 agreement {got}% < {limit}%")
    return GateResult(dict(limits), {k: v for k, v in measured.items() if k in limits}, missed)


def _distinct(value: float, limit: float) -> tuple[str, str]:
    """Both numbers with the fewest significant digits (at least 4) that tell them apart, so a near miss never
    reads as equal."""
    for digits in range(4, 18):
        shown = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return repr(value), repr(limit)


def _agreement(output: Path, reference: Path, settings: EvalSettings, row: int) -> Any:
    """Both models at once on the first `max_tokens` tokens of each text, in rows of `row` tokens (the last row
    of a text shorter; never longer than the window the evaluation chose, which fits both contexts), the
    reference's distribution compared row by row."""
    import torch

    from surgery.evaluation.agreement import next_token_agreement
    from surgery.evaluation.data import first_tokens, load_text
    from surgery.evaluation.loading import load_for_eval

    model = load_for_eval(output, settings.device, settings.dtype, settings.max_memory)
    base = load_for_eval(reference, settings.device, settings.dtype, settings.max_memory)
    rows = []
    for spec in settings.data:
        ids = torch.tensor(first_tokens(model.tokenizer, load_text(spec).text, settings.max_tokens))
        rows += list(ids.split(row))
    if not rows:
        raise SurgeryError("evaluate: limits: the evaluation text has no tokens to compare the models on")
    return next_token_agreement(base.model, model.model, rows)
