"""Plans suggested from measurements (`surgery analyze --suggest`), chosen by measured perplexity on
held-out calibration rows, not by a proxy alone:
- `drop=N`: greedy, one layer at a time, among the remaining layers with the lowest Block Influence;
- `bits=AVG`: a `bits` plan ranking layers by LIM, with a target average over [2, 3, 4, 8];
- `tie=B`: a `tie` plan whose init (average, stepwise, lower) scored best, tied in memory;
- `search_chain`: CoLa's chain-of-layers search (skips and repeats), bounded in time.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.analyze import Analysis
from surgery.errors import SurgeryError

_SPEC = re.compile(r"^(?P<kind>drop|bits|tie)=(?P<value>[0-9.]+)$")
GROUP_SIZES = (128, 64, 32, 16)


@dataclass
class Suggestion:
    kind: str
    plan: str  # YAML, ready for `surgery apply`
    trials: list[dict[str, Any]] = field(default_factory=list)  # what was measured to choose it


def parse_spec(spec: str) -> tuple[str, float]:
    match = _SPEC.match(spec.strip())
    if match is None:
        raise SurgeryError(f"--suggest {spec!r}: write drop=N, bits=AVG or tie=B")
    return match["kind"], float(match["value"])


def held_out_perplexity(model: Any, rows: Any) -> float:
    """exp of the mean next-token loss over the rows (cache off)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            logits = model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, row[1:].to(device), reduction="sum"))
            count += row.numel() - 1
    return math.exp(total / count)


def with_layers(model: Any, prefix: str, keep: list[int], score: Callable[[], float]) -> float:
    """`score()` with the model's layer list cut down to `keep` (restored afterwards)."""
    import torch

    parent_name, _, attribute = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attribute)
    count_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(model.config, k)), None)
    saved = getattr(model.config, count_key) if count_key else None
    setattr(parent, attribute, torch.nn.ModuleList([original[i] for i in keep]))
    if count_key:
        setattr(model.config, count_key, len(keep))
    try:
        return score()
    finally:
        setattr(parent, attribute, original)
        if count_key:
            setattr(model.config, count_key, saved)


def suggest_drop(model: Any, prefix: str, analysis: Analysis, rows: Any, count: int, candidates: int,
                 model_ref: str, log: Callable[[str], None]) -> Suggestion:
    depth = len(analysis.layers)
    if not 1 <= count < depth:
        raise SurgeryError(f"--suggest drop={count}: the model has {depth} layers; drop between 1 and {depth - 1}")
    kept = list(range(depth))
    trials = [{"dropped": [], "perplexity": with_layers(model, prefix, kept, lambda: held_out_perplexity(model, rows))}]
    log(f"all {depth} layers: perplexity {trials[0]['perplexity']:.2f} on {rows.numel():,} held-out tokens")
    by_influence = {m.index: m.bi for m in analysis.layers}
    for step in range(count):
        pool = sorted(kept, key=lambda i: (by_influence[i], i))[:candidates]
        scored = {c: with_layers(model, prefix, [i for i in kept if i != c], lambda: held_out_perplexity(model, rows))
                  for c in pool}
        best = min(scored, key=lambda c: (scored[c], c))
        kept.remove(best)
        log(f"drop {step + 1}/{count}: layer {best} (perplexity {scored[best]:.2f}; candidates "
            + ", ".join(f"{c}: {p:.2f}" for c, p in sorted(scored.items())) + ")")
        trials.append({"dropped": sorted(set(range(depth)) - set(kept)), "perplexity": scored[best],
                       "candidates": {str(c): p for c, p in scored.items()}})
    plan = f"model: {model_ref}\noutput: {model_ref}-drop{count}\nsteps:\n  - op: chain\n    layers: {_ranges(kept)}\n"
    return Suggestion("drop", plan, trials)


def suggest_bits(analysis: Analysis, average: float, group_size: int, model_ref: str, data: str) -> Suggestion:
    plan = (f"model: {model_ref}\noutput: {model_ref}-bits{average:g}\nsteps:\n  - op: bits\n    score: lim\n"
            f"    calibration: {{data: {data}}}\n    assign: {{target_bits: {average:g}, choices: [2, 3, 4, 8]}}\n"
            f"    quantizer: {{method: rtn, group_size: {group_size}, symmetric: true}}\n")
    return Suggestion("bits", plan, [{"lim": [m.lim for m in analysis.layers]}])


def suggest_tie(model_path: Path, loops: int, rows: Any, model_ref: str, device: str,
                log: Callable[[str], None]) -> Suggestion:
    """Each init tied (materialized, in a temporary folder) and scored; the best becomes the plan."""
    from surgery.evaluation.loading import load_for_eval
    from surgery.execute import execute
    from surgery.plan.resolve import resolve
    from surgery.plan.schema import Plan

    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        for init in ("average", "stepwise", "lower"):
            plan = Plan.model_validate({"model": str(model_path), "steps": [
                {"op": "tie", "loops": loops, "init": init, "format": "materialized"}]})
            out = execute(resolve(plan, Path(tmp) / init, device, base_dir=tmp), fsync=False)
            perplexity = held_out_perplexity(load_for_eval(out, device=device, dtype="float32").model, rows)
            log(f"tie loops {loops}, init {init}: perplexity {perplexity:.2f}")
            trials.append({"init": init, "perplexity": perplexity})
    best = min(trials, key=lambda t: t["perplexity"])["init"]
    plan = (f"model: {model_ref}\noutput: {model_ref}-tie{loops}\nsteps:\n  - op: tie\n    loops: {loops}\n"
            f"    init: {best}\n    relax: {{rank: 16}}\n    format: compact\n")
    return Suggestion("tie", plan, trials)


def group_size_for(input_dims: list[int]) -> int:
    """The largest usual group size dividing every matrix's input dimension."""
    for size in GROUP_SIZES:
        if all(d % size == 0 for d in input_dims):
            return size
    raise SurgeryError(f"no group size of {GROUP_SIZES} divides the input dimensions {sorted(set(input_dims))}")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8, 7] -> '[0-2, 5, 7-8, 7]': runs of consecutive layers as ranges."""
    parts, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return "[" + ", ".join(parts) + "]"


def search_chain(model: Any, prefix: str, rows: Any, depth: int, budget: float, penalty: float, model_ref: str,
                 progress: Callable[[float], None], log: Callable[[str], None]) -> Suggestion:
    """CoLa-style search over chains of layers: from the original order, hill-climb on moves that skip
    or repeat a block of 1-4 consecutive positions, keeping the move that lowers
    mean loss + penalty * (length / L) the most, until none does or `budget` seconds are spent.
    Chains run in memory with the layer list replaced (cache off, so a repeated layer is safe)."""
    import time

    start = time.perf_counter()

    def cost(chain: list[int]) -> tuple[float, float]:
        perplexity = with_layers(model, prefix, chain, lambda: held_out_perplexity(model, rows))
        return math.log(perplexity) + penalty * len(chain) / depth, perplexity

    chain = list(range(depth))
    best_cost, best_perplexity = cost(chain)
    trials = [{"chain": chain, "perplexity": best_perplexity, "cost": best_cost}]
    log(f"original order: perplexity {best_perplexity:.2f}")
    improved = True
    while improved and time.perf_counter() - start < budget:
        improved = False
        candidate_best = None
        for move in _moves(chain):
            if time.perf_counter() - start >= budget:
                break
            progress(min(1.0, (time.perf_counter() - start) / budget))
            value, perplexity = cost(move)
            if value < best_cost - 1e-9 and (candidate_best is None or value < candidate_best[0]):
                candidate_best = (value, perplexity, move)
        if candidate_best is not None:
            best_cost, best_perplexity, chain = candidate_best
            improved = True
            trials.append({"chain": chain, "perplexity": best_perplexity, "cost": best_cost})
            log(f"chain {_ranges(chain)}: perplexity {best_perplexity:.2f}")
    progress(1.0)
    plan = f"model: {model_ref}\noutput: {model_ref}-chain\nsteps:\n  - op: chain\n    layers: {_ranges(chain)}\n"
    return Suggestion("chain", plan, trials)


def _moves(chain: list[int]) -> list[list[int]]:
    """Every chain one skip or one repeat of a block (1-4 positions) away, shortest first."""
    moves = []
    for size in range(1, 5):
        for at in range(0, len(chain) - size + 1):
            if len(chain) > size:
                moves.append(chain[:at] + chain[at + size:])
            moves.append(chain[: at + size] + chain[at: at + size] + chain[at + size:])
    return moves
