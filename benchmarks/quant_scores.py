"""What the quantization benchmarks measure on a quantized output, the same way for each: held-out
perplexity, and KL divergence to the unquantized model's next-token distribution with top-1 agreement,
on the first tokens of builtin:mixed-heldout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery import pipeline
from surgery.evaluation.agreement import next_token_agreement
from surgery.evaluation.data import load_text
from surgery.evaluation.importance import calibration_batches
from surgery.evaluation.loading import load_for_eval
from surgery.evaluation.run import EvalSettings, evaluate


@dataclass
class Scores:
    perplexity: float
    kl: float
    top1: float

    def cells(self) -> str:
        return f"{self.perplexity:.2f} | {self.kl:.5f} | {self.top1:.4f}"


class Scorer:
    HEADER = "perplexity | KL to unquantized (nats/token) | top-1 agreement"

    def __init__(self, base: Path, max_tokens: int) -> None:
        self.settings = EvalSettings(data=("builtin:mixed-heldout",), max_tokens=max_tokens, device="cpu",
                                     dtype="float32")
        self.reference = load_for_eval(base, "cpu", "float32")
        self.rows = calibration_batches(self.reference.tokenizer, load_text("builtin:mixed-heldout").text,
                                        max_tokens // 256, 256, "benchmark")
        self.base_perplexity = evaluate(base, self.settings).perplexity

    def __call__(self, out: Path) -> Scores:
        agreement = next_token_agreement(self.reference.model, load_for_eval(out, "cpu", "float32").model, self.rows)
        return Scores(evaluate(out, self.settings).perplexity, agreement.kl, agreement.top1)


def apply_step(work: Path, base: Path, step: str, name: str = "out") -> Path:
    """One step (its YAML lines, from `  - op:`) applied to `base`, written to work/NAME."""
    plan = work / "plan.yaml"
    plan.write_text(f"model: {base}\noutput: {work / name}\nsteps:\n{step}")
    return pipeline.apply(plan, device="cpu", force=True, fsync=False).output


def apply_bits(work: Path, base: Path, step: str) -> Path:
    """One `bits` step (its YAML lines after `op`, indented four spaces) applied to `base`."""
    return apply_step(work, base, f"  - op: bits\n{step}")
