"""CoLa's chain-of-layers search (`surgery analyze --search-chain`): skips and repeats of blocks of
layers, chosen by measured perplexity in memory, bounded in time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from surgery.analysis.measure import Session
from surgery.analysis.suggestions import Suggestion, layer_ranges, plan_text
from surgery.analysis.trial import chain_perplexity


def search_chain(session: Session, budget: float, penalty: float, progress: Callable[[float], None],
                 log: Callable[[str], None]) -> Suggestion:
    """From the original order, hill-climb on moves that skip or repeat a block of 1-4 consecutive
    positions, keeping the move that lowers mean loss + penalty * (length / L) the most, until none
    does or `budget` seconds are spent."""
    start = time.perf_counter()
    depth = len(session.analysis.layers)

    def cost(chain: list[int]) -> tuple[float, float]:
        perplexity = chain_perplexity(session.model, session.prefix, session.held_out, chain)
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
            log(f"chain [{', '.join(map(str, layer_ranges(chain)))}]: perplexity {best_perplexity:.2f}")
    progress(1.0)
    if len(trials) == 1:
        log("the chain search found no chain better than the original order: the plan keeps every layer")
    return Suggestion("chain", plan_text(session, "chain", [{"op": "chain", "layers": layer_ranges(chain)}]), trials)


def _moves(chain: list[int]) -> list[list[int]]:
    """Every chain one skip or one repeat of a block (1-4 positions) away, shortest first."""
    moves = []
    for size in range(1, 5):
        for at in range(0, len(chain) - size + 1):
            if len(chain) > size:
                moves.append(chain[:at] + chain[at + size:])
            moves.append(chain[: at + size] + chain[at: at + size] + chain[at + size:])
    return moves
