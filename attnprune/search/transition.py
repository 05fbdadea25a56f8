"""The ``transition`` strategy: a non-attention scorer below depth ``t``, attention from ``t`` on, searched over
``t``, the scorer and the reducer, the keep fraction tuned to the budget (the ``label_free`` strategy picks the same
kind of routing from the selectivity analysis instead)."""

from __future__ import annotations

import time
from functools import partial

from tqdm.auto import tqdm

from attnprune.reduction import REDUCERS
from attnprune.search.space import InfeasibleBudget, transition_routing, tune_keep
from attnprune.search.state import SearchState
from attnprune.search.strategy import SearchContext

__all__ = ["transition"]


def transition(context: SearchContext, state: SearchState) -> None:
    """Every transition depth, scorer and reducer, each at the keep fraction that meets the budget."""
    model, evaluator, space = context.model, context.evaluator, context.space
    depth = len(model.blocks)
    layers = space.pruning_layers(depth)
    low = space.non_attention_scorers()
    reducers = [r for r in space.reducers if REDUCERS[r].takes_score] or ["drop"]
    grid = [(t, s, r) for r in reducers for s in low for t in range(0, depth + 1) if not (t == 0 and s != low[0])]
    bar = tqdm(total=len(grid), initial=state.step, desc="routing search (transition)", disable=not context.progress)
    for step in range(state.step, len(grid)):
        started = time.perf_counter()
        t, scorer, reduce = grid[step]
        make = partial(transition_routing, layers, t, scorer, space.attention, reduce)
        routing = tune_keep(model, make, context.target)
        if routing is not None:
            state.consider(routing, evaluator.measure(evaluator.initial(), routing, 0))
        state.step = step + 1
        state.checkpoint(evaluator, context.path, started)
        bar.update(1)
    bar.close()
    if state.best is None:
        raise InfeasibleBudget("no transition routing meets the budget; widen the space or raise the budget")
