"""One pydantic model per op. Unknown keys are errors: a typo must never pass silently."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_SINGLE = re.compile(r"^\s*(\d+)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _nonempty_list(value: Any) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("no layers given; list at least one layer, e.g. [0-7, 12]")
    return items


def parse_layers(value: Any) -> list[int]:
    """Ints and inclusive "a-b" ranges, alone or in a list, to layer indices in order."""
    items = _nonempty_list(value)
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{item!r} is not a layer; use an integer or an inclusive range like '0-7'")
        if isinstance(item, int):
            if item < 0:
                raise ValueError(f"layer {item} is negative; layers count from 0")
            out.append(item)
            continue
        if isinstance(item, str):
            if m := _SINGLE.match(item):
                out.append(int(m[1]))
                continue
            if m := _RANGE.match(item):
                start, stop = int(m[1]), int(m[2])
                if stop < start:
                    raise ValueError(
                        f"range '{item}' is reversed; write '{stop}-{start}' or list the layers in the order you want"
                    )
                out.extend(range(start, stop + 1))
                continue
        raise ValueError(f"{item!r} is not a layer; use an integer or an inclusive range like '0-7'")
    return out


class LayerEntry(_Strict):
    """A run of layers, optionally from another model, optionally with some tensors scaled."""

    model: str | None = Field(default=None, description="Source model; default: the plan's model.")
    layers: list[int] = Field(description="Layer indices: ints and inclusive 'a-b' ranges.")
    scale: dict[str, float] | None = Field(
        default=None, description="Multiply the tensors of these modules (e.g. o_proj: 0.5) in these layers."
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> list[int]:
        return parse_layers(value)


class ChainStep(_Strict):
    """Write a model whose layers are any sequence of source layers (CoLa, mergekit passthrough)."""

    op: Literal["chain"]
    layers: list[LayerEntry] = Field(min_length=1)

    @field_validator("layers", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> list[Any]:
        """Bare ints and ranges are entries from the current model; consecutive ones form one entry."""
        entries: list[Any] = []
        for item in _nonempty_list(value):
            if isinstance(item, dict):
                entries.append(item)
            elif entries and isinstance(entries[-1], LayerEntry) and entries[-1].model is None:
                entries[-1] = LayerEntry(layers=entries[-1].layers + parse_layers(item))
            else:
                entries.append(LayerEntry(layers=parse_layers(item)))
        return entries


class MergeModel(_Strict):
    """A fine-tuned model whose task vector (model - base) takes part in a merge."""

    model: str
    weight: float = Field(default=1.0, description="Its lambda_t: how much of its task vector is added.")


def _models(value: Any) -> Any:
    """A bare path stands for {model: path}."""
    if isinstance(value, list):
        return [{"model": item} if isinstance(item, str) else item for item in value]
    return value


class TaskArithmeticStep(_Strict):
    """theta = theta_base + sum_t weight_t * (theta_t - theta_base) (Ilharco et al. 2023)."""

    op: Literal["task_arithmetic"]
    models: list[MergeModel] = Field(min_length=1)

    bare_paths = field_validator("models", mode="before")(_models)


class TiesStep(_Strict):
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, then base + lambda * merged."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    op: Literal["ties"]
    models: list[MergeModel] = Field(min_length=1)
    density: float = Field(default=0.2, gt=0, le=1, description="Fraction of each task vector's entries kept.")
    lam: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")

    bare_paths = field_validator("models", mode="before")(_models)


class LinesStep(_Strict):
    """LiNeS (Wang et al. 2024): scale the current update by depth, alpha + beta * l / (L - 1)."""

    op: Literal["lines"]
    alpha: float | None = Field(default=None, description="Scale of the first layer and of tensors outside the layers.")
    beta: float | None = Field(default=None, description="Added scale at the last layer (single-task default 1 - alpha).")


class LearnSettings(_Strict):
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


Granularity = Literal["tensor", "layer", "module"]


class AtlasStep(_Strict):
    """aTLAS (Zhang et al. 2024): theta = theta_base + sum_t Lambda_t tau_t, one coefficient per block."""

    op: Literal["atlas"]
    models: list[MergeModel] = Field(min_length=1)
    granularity: Granularity = "tensor"
    coefficients: dict[str, float | dict[str, float]] | None = Field(
        default=None, description="Per model: one number for every block, or a number per block."
    )
    learn: LearnSettings | None = None

    bare_paths = field_validator("models", mode="before")(_models)

    @field_validator("coefficients", mode="before")
    @classmethod
    def _block_names(cls, value: Any) -> Any:
        """Layer blocks may be written as YAML integers."""
        if isinstance(value, dict):
            return {k: ({str(b): c for b, c in v.items()} if isinstance(v, dict) else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> AtlasStep:
        if (self.coefficients is None) == (self.learn is None):
            raise ValueError("give either 'coefficients' (a mapping) or 'learn' (settings to learn them), not both or neither")
        return self


class RelaxSettings(_Strict):
    """Per-depth low-rank corrections of the shared weights (Relaxed Recursive Transformers)."""

    rank: int | Literal["full"] = Field(default=16, description="LoRA rank r (capped at min(out, in)), or full.")
    modules: list[str] | None = Field(
        default=None, description="Linear modules relaxed, e.g. [q_proj, down_proj]; default every matrix of a layer."
    )
    vectors: Literal["per_depth", "shared"] = Field(
        default="per_depth", description="Norm weights and biases: kept per depth (default) or tied like the matrices."
    )

    @field_validator("rank", mode="before")
    @classmethod
    def _at_least_one(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"rank {value} is below 1; leave 'relax' out for a strictly recursive model")
        return value


class TieStep(_Strict):
    """Layer tying: K shared layers looped to the original depth, optionally relaxed per depth by LoRA."""

    op: Literal["tie"]
    loops: int | None = Field(default=None, ge=1, description="B: how many times the shared block repeats (L/B slots).")
    strategy: Literal["cycle", "sequence"] = Field(
        default="cycle", description="cycle: depth l uses slot l mod K; sequence: slot l div B."
    )
    block: list[list[int]] | None = Field(
        default=None, description="Instead of loops: the layers tied into each shared slot, e.g. [[0, 3], [1, 4], [2, 5]]."
    )
    init: Literal["average", "stepwise", "lower"] = "average"
    relax: RelaxSettings | None = None
    format: Literal["compact", "materialized"] = "compact"

    @field_validator("block", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        return None if value is None else [parse_layers(group) for group in _nonempty_list(value)]

    @model_validator(mode="after")
    def _one_map(self) -> TieStep:
        if (self.loops is None) == (self.block is None):
            raise ValueError("give either 'loops' (how many times the shared block repeats) or 'block' (the layers "
                             "tied into each slot), not both or neither")
        return self


class EnsembleStep(_Strict):
    """Logit averaging (Growing Transformers): one model whose next-token logits are the weighted mean
    of its members' (or, with combine: probs, whose distribution is the weighted mixture of theirs)."""

    op: Literal["ensemble"]
    members: list[str] = Field(min_length=1, description="Model folders sharing one tokenizer.")
    weights: list[float] | None = Field(default=None, description="One per member (default equal); normalised by their sum.")
    combine: Literal["logits", "probs"] = "logits"
    layout: Literal["reference", "copy"] = Field(
        default="reference", description="reference: members stay where they are (path and sha256); copy: copied in."
    )

    @model_validator(mode="after")
    def _weights(self) -> EnsembleStep:
        if self.weights is not None:
            if len(self.weights) != len(self.members):
                raise ValueError(f"{len(self.weights)} weights for {len(self.members)} members; give one weight per member")
            if sum(self.weights) <= 0:
                raise ValueError(f"weights sum to {sum(self.weights):g}; they must sum to a positive number")
            if self.combine == "probs" and min(self.weights) < 0:
                raise ValueError("combine: probs mixes distributions, so weights must not be negative")
        return self


class Calibration(_Strict):
    """Text the model runs on for scores that need activations (LIM, BI)."""

    data: str = Field(default="builtin", description="builtin, builtin:NAME, or a .txt/.jsonl file.")
    samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=256, ge=2)


class BitAssignment(_Strict):
    """Either two widths and the fraction of layers given the low one, or a target average over choices."""

    high: int | None = Field(default=None, ge=1, le=16)
    low: int | None = Field(default=None, ge=1, le=16)
    low_fraction: float | None = Field(default=None, ge=0, le=1)
    target_bits: float | None = Field(default=None, gt=0)
    choices: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> BitAssignment:
        pair = (self.high, self.low, self.low_fraction)
        target = (self.target_bits, self.choices)
        if all(v is not None for v in pair) and all(v is None for v in target):
            return self
        if all(v is not None for v in target) and all(v is None for v in pair):
            return self
        raise ValueError("give {high, low, low_fraction} or {target_bits, choices}")


class Quantizer(_Strict):
    method: Literal["rtn"] = "rtn"
    group_size: int = Field(default=128, ge=1)
    symmetric: bool = False


class BitsStep(_Strict):
    """Layer-wise bit assignment (Dumitru et al. 2024): important layers keep more bits."""

    op: Literal["bits"]
    score: Literal["lim", "zd", "bi", "manual"] = "lim"
    calibration: Calibration = Calibration()
    assign: BitAssignment | None = None
    manual: dict[int, int] | None = Field(default=None, description="Bits by layer; overrides the assignment.")
    quantizer: Quantizer = Quantizer()
    keep: list[str] = Field(default_factory=lambda: ["embed", "lm_head", "norms"],
                            description="Tensors left in the source dtype, by name part; norms: every 1-D tensor.")
    format: Literal["dense", "compressed-tensors"] = "dense"

    @model_validator(mode="after")
    def _assignment(self) -> BitsStep:
        if self.score != "manual" and self.assign is None:
            raise ValueError(f"score: {self.score} ranks layers for an 'assign' section; add one, e.g. "
                             "{high: 8, low: 4, low_fraction: 0.5}")
        if self.score == "manual" and not self.manual:
            raise ValueError("score: manual needs 'manual': the bits of every layer, e.g. {0: 8, 1: 4}")
        return self


class MaterializeStep(_Strict):
    """A compact recursive model as a standard checkpoint (each depth: shared + B A)."""

    op: Literal["materialize"]


Step = Annotated[
    ChainStep | TaskArithmeticStep | TiesStep | LinesStep | AtlasStep | TieStep | MaterializeStep | EnsembleStep
    | BitsStep,
    Field(discriminator="op"),
]
OPS: dict[str, type[BaseModel]] = {
    "chain": ChainStep, "task_arithmetic": TaskArithmeticStep, "ties": TiesStep, "lines": LinesStep, "atlas": AtlasStep,
    "tie": TieStep, "materialize": MaterializeStep, "ensemble": EnsembleStep,
    "bits": BitsStep,
}


class EvaluateSection(_Strict):
    """Score the output after `apply`, beside a reference model, on the same tokens."""

    data: list[str] = Field(default_factory=lambda: ["builtin"], description="builtin, builtin:NAME, or files.")
    max_tokens: int = Field(default=8192, ge=2, description="Score the first N tokens of each text.")
    window: int | None = Field(default=None, ge=2, description="Tokens per forward pass (default: min(2048, context)).")
    stride: int | None = Field(default=None, ge=1, description="New tokens per window (default: window / 2).")
    batch_size: int = Field(default=4, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    compare_to: str = Field(default="model", description="base | model | PATH: the reference scored beside it.")

    @field_validator("data", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class PushSection(_Strict):
    """Push the output to the Hugging Face Hub after a successful apply (and evaluation)."""

    repo: str = Field(description="OWNER/NAME on the Hub.")
    private: bool = False
    revision: str | None = Field(default=None, description="Branch to push to (created if needed).")


class Plan(_Strict):
    """A whole plan: the source model, where to write, and the steps applied in one streaming pass."""

    model: str | None = Field(default=None, description="The model the steps edit (path or demo:NAME).")
    base: str | None = Field(default=None, description="The pretrained model edits are measured against.")
    output: str | None = Field(default=None, description="Output folder; `--out` overrides it.")
    steps: list[Step] = Field(min_length=1)
    evaluate: EvaluateSection | None = None
    push: PushSection | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _known_ops(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, step in enumerate(value):
                if isinstance(step, dict) and "op" not in step:
                    raise ValueError(f"step {i} has no 'op'; known ops: {', '.join(OPS)}")
                if isinstance(step, dict) and step["op"] not in OPS:
                    raise ValueError(f"step {i}: unknown op {step['op']!r}; known ops: {', '.join(OPS)}")
        return value

    @model_validator(mode="after")
    def _whole_model_steps(self) -> Plan:
        if any(isinstance(step, EnsembleStep) for step in self.steps):
            if len(self.steps) > 1:
                raise ValueError("an ensemble combines whole models: it must be the plan's only step")
            if self.model is not None:
                raise ValueError("an ensemble takes its models from 'members'; leave 'model:' out")
        return self

    @model_validator(mode="after")
    def _compact_last(self) -> Plan:
        for i, step in enumerate(self.steps[:-1]):
            if isinstance(step, TieStep) and step.format == "compact":
                raise ValueError(f"step {i}: tie with format: compact must be the last step (compact is a storage "
                                 "format); use format: materialized to keep editing after it")
        return self
