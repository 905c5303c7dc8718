"""Plans suggested from measurements (`surgery analyze --suggest`), chosen by measured perplexity on
held-out calibration rows, not by a proxy alone:
- `drop=N`: greedy, one layer at a time, among the remaining layers with the lowest Block Influence;
- `bits=AVG`: a `bits` plan ranking layers by LIM, with a target average over [2, 3, 4, 8];
- `tie=B`: a `tie` plan whose init (average, stepwise, lower) scored best, each tied by the pipeline.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgery.analysis.measure import Session
from surgery.analysis.trial import chain_perplexity, held_out_perplexity
from surgery.errors import SurgeryError
from surgery.plan.references import hub_origin

_SPEC = re.compile(r"^(?P<kind>drop|bits|tie)=(?P<value>[0-9.]+)$")
GROUP_SIZES = (128, 64, 32, 16)
BIT_CHOICES = [2, 3, 4, 8]
Log = Callable[[str], None]


@dataclass
class Suggestion:
    kind: str
    plan: str  # YAML, ready for `surgery apply`
    trials: list[dict[str, Any]] = field(default_factory=list)  # what was measured to choose it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_spec(spec: str) -> tuple[str, float]:
    match = _SPEC.match(spec.strip())
    if match is None:
        raise SurgeryError(f"--suggest {spec!r}: write drop=N, bits=AVG or tie=B")
    return match["kind"], float(match["value"])


def suggest(session: Session, spec: tuple[str, float], candidates: int, log: Log) -> Suggestion:
    """The suggestion `--suggest KIND=VALUE` asks for."""
    kind, value = spec
    if kind == "drop":
        return suggest_drop(session, int(value), candidates, log)
    if kind == "bits":
        return suggest_bits(session, value)
    return suggest_tie(session, int(value), log)


def suggest_drop(session: Session, count: int, candidates: int, log: Log) -> Suggestion:
    depth = len(session.analysis.layers)
    if not 1 <= count < depth:
        raise SurgeryError(f"--suggest drop={count}: the model has {depth} layers; drop between 1 and {depth - 1}")

    def score(chain: list[int]) -> float:
        return chain_perplexity(session.model, session.prefix, session.held_out, chain)

    kept = list(range(depth))
    trials: list[dict[str, Any]] = [{"dropped": [], "perplexity": score(kept)}]
    log(f"all {depth} layers: perplexity {trials[0]['perplexity']:.2f} on {session.held_out.numel():,} held-out tokens")
    by_influence = {m.index: m.bi for m in session.analysis.layers}
    for step in range(count):
        pool = sorted(kept, key=lambda i: (by_influence[i], i))[:candidates]
        scored = {c: score([i for i in kept if i != c]) for c in pool}
        best = min(scored, key=lambda c: (scored[c], c))
        kept.remove(best)
        log(f"drop {step + 1}/{count}: layer {best} (perplexity {scored[best]:.2f}; candidates "
            + ", ".join(f"{c}: {p:.2f}" for c, p in sorted(scored.items())) + ")")
        trials.append({"dropped": sorted(set(range(depth)) - set(kept)), "perplexity": scored[best],
                       "candidates": {str(c): p for c, p in scored.items()}})
    return Suggestion("drop", plan_text(session, f"drop{count}", [{"op": "chain", "layers": layer_ranges(kept)}]),
                      trials)


def suggest_bits(session: Session, average: float) -> Suggestion:
    step = {"op": "bits", "score": "lim", "calibration": {"data": session.data[0]},
            "assign": {"target_bits": average, "choices": BIT_CHOICES},
            "quantizer": {"method": "rtn", "group_size": group_size_for(session.input_dims), "symmetric": True}}
    return Suggestion("bits", plan_text(session, f"bits{average:g}", [step]),
                      [{"lim": [m.lim for m in session.analysis.layers]}])


def suggest_tie(session: Session, loops: int, log: Log) -> Suggestion:
    """Each init tied (materialized, in a temporary folder) by the pipeline and scored; the best becomes the plan."""
    from surgery.evaluation.loading import load_for_eval
    from surgery.pipeline import apply
    from surgery.plan.schema import Plan

    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        for init in ("average", "stepwise", "lower"):
            plan = Plan.model_validate({"model": str(session.path), "steps": [
                {"op": "tie", "loops": loops, "init": init, "format": "materialized"}]})
            out = apply(plan, out=Path(tmp) / init, device=session.device, fsync=False,
                        max_memory=session.max_memory).output
            trial = load_for_eval(out, device=session.device, dtype="float32", max_memory=session.max_memory)
            perplexity = held_out_perplexity(trial.model, session.held_out)
            log(f"tie loops {loops}, init {init}: perplexity {perplexity:.2f}")
            trials.append({"init": init, "perplexity": perplexity})
    best = min(trials, key=lambda t: t["perplexity"])["init"]
    step = {"op": "tie", "loops": loops, "init": best, "relax": {"rank": 16}, "format": "compact"}
    return Suggestion("tie", plan_text(session, f"tie{loops}", [step]), trials)


def group_size_for(input_dims: list[int]) -> int:
    """The largest usual group size dividing every matrix's input dimension."""
    for size in GROUP_SIZES:
        if all(d % size == 0 for d in input_dims):
            return size
    raise SurgeryError(f"no group size of {GROUP_SIZES} divides the input dimensions {sorted(set(input_dims))}")


def plan_text(session: Session, suffix: str, steps: list[dict[str, Any]]) -> str:
    """A plan for the analysed model, as YAML: the model by its Hub id where it has one, the output
    NAME-SUFFIX beside the plan file (never inside the model's own folder or a cache)."""
    origin = hub_origin(session.path)
    model = origin.repo if origin else str(session.path)
    name = (origin.repo.split("/")[-1] if origin else session.path.name) or "model"
    plan = {"model": model, "output": f"./{name}-{suffix}", "steps": steps}
    return yaml.safe_dump(plan, sort_keys=False, default_flow_style=None)


def layer_ranges(indices: list[int]) -> list[int | str]:
    """[0, 1, 2, 5, 7, 8, 7] -> [0-2, 5, 7-8, 7]: runs of consecutive layers as a plan's ranges."""
    parts: list[int | str] = []
    start = None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            parts.append(start if start == index else f"{start}-{index}")
            start = None
    return parts
