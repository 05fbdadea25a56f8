"""The ``transition`` strategies: a non-attention scorer below depth ``t``, attention from ``t`` on.

- ``transition``: searched over ``t``, the scorer and the reducer, the keep fraction tuned to the budget.
- ``label_free``: ``t`` and the scorer chosen from the selectivity analysis alone (its oracle needs no labels).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from attnprune.search.evaluator import Evaluator
from attnprune.search.space import InfeasibleBudget, SearchSpace, transition_routing, tune_keep
from attnprune.search.state import SearchState

__all__ = ["transition", "label_free"]


def transition(
    model: VisionTransformer,
    evaluator: Evaluator,
    space: SearchSpace,
    target: float,
    state: SearchState,
    path: Path | None,
    progress: bool,
    **_: Any,
) -> SearchState:
    """Every transition depth, scorer and reducer, each at the keep fraction that meets the budget."""
    depth = len(model.blocks)
    layers = space.pruning_layers(depth)
    low = space.non_attention_scorers()
    reducers = [r for r in space.reducers if r != "merge"] or ["drop"]
    grid = [(t, s, r) for r in reducers for s in low for t in range(0, depth + 1) if not (t == 0 and s != low[0])]
    bar = tqdm(total=len(grid), initial=state.step, desc="routing search (transition)", disable=not progress)
    for step in range(state.step, len(grid)):
        started = time.perf_counter()
        t, scorer, reduce = grid[step]
        routing = tune_keep(model, partial(transition_routing, layers, t, scorer, space.attention, reduce), target)
        if routing is not None:
            state.consider(routing, evaluator.measure(evaluator.initial(), routing, 0))
        state.step = step + 1
        state.checkpoint(evaluator, path, started)
        bar.update(1)
    bar.close()
    if state.best is None:
        raise InfeasibleBudget("no transition routing meets the budget; widen the space or raise the budget")
    return state


def label_free(
    model: VisionTransformer,
    evaluator: Evaluator,
    space: SearchSpace,
    target: float,
    state: SearchState,
    path: Path | None,
    progress: bool,
    analysis_images: int = 256,
    **_: Any,
) -> SearchState:
    """The transition depth where attention's oracle agreement takes the lead, and the best non-attention scorer
    below it, from the selectivity analysis; the keep fraction tuned to the budget."""
    from attnprune.selectivity import SelectivityAnalyzer, attention_transition_depth
    from attnprune.selectivity.transition import informative_layers

    started = time.perf_counter()
    depth = len(model.blocks)
    layers = space.pruning_layers(depth)
    low = space.non_attention_scorers()
    analyzer = SelectivityAnalyzer(depth, model.has_class_token, scorers=[*low, space.attention])
    seen = 0
    for batch in evaluator.raw:  # the oracle needs no labels: only the images
        analyzer.update(model, batch[: analysis_images - seen])
        seen += min(len(batch), analysis_images - seen)
        if seen >= analysis_images:
            break
    results = analyzer.compute()
    t = attention_transition_depth(results, space.attention, informative_layers(model))
    t = depth if t is None else t
    below = [layer for layer in range(depth) if layer < max(t, 1)]
    scorer = max(low, key=lambda s: sum(results[f"reliability_spearman_{s}"][i] for i in below))
    reduce = "fuse" if "fuse" in space.reducers else "drop"
    routing = tune_keep(model, partial(transition_routing, layers, t, scorer, space.attention, reduce), target)
    if routing is None:
        raise InfeasibleBudget("the label-free routing cannot meet the budget; raise the budget")
    state.consider(routing, evaluator.measure(evaluator.initial(), routing, 0))
    state.step = 1
    state.transition_depth = t
    state.checkpoint(evaluator, path, started)
    return state
