"""The ``label_free`` strategy: the transition routing (a non-attention scorer below depth ``t``, attention from ``t``
on) with ``t`` and the scorer chosen from the selectivity analysis alone, whose oracle needs no labels."""

from __future__ import annotations

import time
from functools import partial

from attnprune.errors import UserError
from attnprune.search.space import InfeasibleBudget, transition_routing, tune_keep
from attnprune.search.state import SearchState
from attnprune.search.strategy import SearchContext

__all__ = ["label_free", "ANALYSIS_IMAGES"]

ANALYSIS_IMAGES = 256  # images the selectivity analysis runs on


def label_free(context: SearchContext, state: SearchState) -> None:
    """The transition depth where attention's oracle agreement takes the lead, and the best non-attention scorer
    below it, from the selectivity analysis; the keep fraction tuned to the budget."""
    from attnprune.selectivity import SelectivityAnalyzer, attention_transition_depth
    from attnprune.selectivity.transition import informative_layers

    model, evaluator, space = context.model, context.evaluator, context.space
    started = time.perf_counter()
    depth = len(model.blocks)
    low = space.non_attention_scorers()
    analyzer = SelectivityAnalyzer(depth, model.has_class_token, scorers=[*low, space.attention])
    analyzer.to(evaluator.inputs[0].device)
    if evaluator.shard.size > ANALYSIS_IMAGES:
        raise UserError(f"search strategy 'label_free' analyses {ANALYSIS_IMAGES} images: it cannot use more ranks")
    left = evaluator.shard.count(ANALYSIS_IMAGES)  # this rank's share of them; the metrics add up every rank's
    for batch in evaluator.raw:  # the oracle needs no labels: only the images
        if left <= 0:
            break
        analyzer.update(model, batch[:left])
        left -= len(batch)
    results = analyzer.compute()
    t = attention_transition_depth(results, space.attention, informative_layers(model))
    t = depth if t is None else t
    below = [layer for layer in range(depth) if layer < max(t, 1)]
    scorer = max(low, key=lambda s: sum(results[f"reliability_spearman_{s}"][i] for i in below))
    reduce = "fuse" if "fuse" in space.reducers else "drop"
    make = partial(transition_routing, space.pruning_layers(depth), t, scorer, space.attention, reduce)
    routing = tune_keep(model, make, context.target)
    if routing is None:
        raise InfeasibleBudget("the label-free routing cannot meet the budget; raise the budget")
    state.consider(routing, evaluator.measure(evaluator.initial(), routing, 0))
    state.step = 1
    state.transition_depth = t
    state.checkpoint(evaluator, context.path, started)
