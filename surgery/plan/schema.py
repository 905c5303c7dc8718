"""A plan: the source model, where to write, the steps, and what to do after (`evaluate:`, `push:`).

Each step's model comes from its op (`surgery/ops/`): the union of steps is the op registry's.
Unknown keys are errors: a typo must never pass silently.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Annotated, Any, Union

from pydantic import Field, field_validator, model_validator

from surgery.errors import SurgeryError
from surgery.formatting import memory_bytes
from surgery.ops.fields import Strict
from surgery.ops.registry import registry

Step = Annotated[Union[tuple(op.step for op in registry().values())], Field(discriminator="op")]  # noqa: UP007


class Limits(Strict):
    """What the output must meet against the model it is compared with, on the evaluation text."""

    perplexity_increase: float | None = Field(default=None, ge=0, description="Most the perplexity may rise over the "
                                              "reference's, as a fraction: 0.05 is 5%.")
    kl: float | None = Field(default=None, ge=0, description="Most mean KL(reference || output) per token, in nats.")
    top1_agreement: float | None = Field(default=None, ge=0, le=1, description="Least fraction of tokens whose most "
                                         "likely next token is the reference's.")

    def set(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class EvaluateSection(Strict):
    """Score the output after `apply`, beside a reference model, on the same tokens."""

    data: list[str] = Field(default_factory=lambda: ["builtin"], description="builtin, builtin:NAME, or files.")
    max_tokens: int = Field(default=8192, ge=2, description="Score the first N tokens of each text.")
    window: int | None = Field(default=None, ge=2, description="Tokens per forward pass (default: min(2048, context)).")
    stride: int | None = Field(default=None, ge=1, description="New tokens per window (default: window / 2).")
    batch_size: int = Field(default=4, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    compare_to: str = Field(default="model", description="base | model | PATH: the reference scored beside it.")
    max_memory: str | None = Field(default=None, description="At most this much of each model's weights on the "
                                   "device (e.g. 20GB); the rest waits in CPU memory or on disk (surgery[offload]).")
    limits: Limits | None = Field(default=None, description="Quality gates: a run that misses them keeps its output, "
                                  "says so, exits 3 and does not push.")

    @field_validator("data", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _a_size(cls, value: Any) -> Any:
        if value is not None:
            try:
                memory_bytes(str(value))
            except SurgeryError as e:
                raise ValueError(str(e)) from None
        return None if value is None else str(value)

    def memory_cap(self) -> int | None:
        return None if self.max_memory is None else memory_bytes(self.max_memory)


class PushSection(Strict):
    """Push the output to the Hugging Face Hub after a successful apply (and evaluation)."""

    repo: str = Field(description="OWNER/NAME on the Hub.")
    private: bool = False
    revision: str | None = Field(default=None, description="Branch to push to (created if needed).")


class Plan(Strict):
    """A whole plan: the source model, where to write, and the steps applied in one streaming pass."""

    model: str | None = Field(default=None, description="The model the steps edit (path, Hub id or demo:NAME).")
    base: str | None = Field(default=None, description="The pretrained model edits are measured against.")
    output: str | None = Field(default=None, description="Output folder; `--out` overrides it.")
    stack: str | None = Field(default=None, description="The layer stack the steps edit where a model has several "
                              "(text, vision, audio, encoder, decoder; `surgery inspect` lists them). Default: the "
                              "language model.")
    steps: list[Step] = Field(min_length=1)
    evaluate: EvaluateSection | None = None
    push: PushSection | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _known_ops(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, step in enumerate(value):
                if isinstance(step, dict) and "op" not in step:
                    raise ValueError(f"step {i} has no 'op'; known ops: {', '.join(registry())}")
                if isinstance(step, dict) and str(step["op"]) not in registry():
                    known = ", ".join(_nearest_first(str(step["op"])))
                    raise ValueError(f"step {i}: unknown op {step['op']!r}; known ops: {known}")
        return value

    @model_validator(mode="after")
    def _placement(self) -> Plan:
        for index, step in enumerate(self.steps):
            problem = step.placement_error(index, list(self.steps), self.model)
            if problem is not None:
                raise ValueError(problem)
            if self.stack is not None and not step.edits_any_stack:
                raise ValueError(f"step {index}: {step.op} edits the language model only; leave 'stack: {self.stack}' "
                                 "out (chain, lines and the merges can edit another stack)")
        return self

    def starting_model(self) -> str | None:
        """The model the steps edit: `model:`, else the first a step names, else the base (merges start from it)."""
        named = next((m for step in self.steps if (m := step.starting_model()) is not None), None)
        return self.model or named or self.base


def _nearest_first(op: str) -> list[str]:
    """The known ops, the ones closest to a misspelt name first."""
    close = get_close_matches(op, list(registry()), n=3, cutoff=0.5)
    return close + [name for name in registry() if name not in close]
