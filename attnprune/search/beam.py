"""The ``beam`` strategy: decide one layer at a time, screen every candidate cheaply, confirm the best on all images.

A partial routing is completed by ToMe merging in the layers still undecided (:func:`completion`), so every candidate
is a complete routing within budget, and the first ones evaluated include ToMe itself. The token states of each fixed
prefix are cached, so a candidate at layer ``l`` runs only blocks ``l`` to the end. A last pass spends what the best
routing leaves of the budget, one milder rule at a time, while the objective does not get worse.
"""

from __future__ import annotations

import time
from dataclasses import replace

from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from attnprune.flops import count_flops
from attnprune.routing import Routing, Rule
from attnprune.search.evaluator import Evaluator, States
from attnprune.search.space import SearchSpace, completion, milder
from attnprune.search.state import BeforeFill, Best, SearchState
from attnprune.search.strategy import SearchContext

__all__ = ["beam", "fill_budget"]

Prefix = tuple[States, int]  # token states of a fixed prefix and the block they enter


def beam(context: SearchContext, state: SearchState) -> None:
    """Run (or resume) the beam search in ``state``; see the module docstring."""
    evaluator, options = context.evaluator, context.options
    layers = context.space.pruning_layers(len(context.model.blocks))
    bar = tqdm(total=len(layers), initial=state.step, desc="routing search (beam)", disable=not context.progress)
    for step in range(state.step, len(layers)):
        started = time.perf_counter()
        layer, free = layers[step], layers[step + 1 :]
        screened: list[tuple[float, tuple[Rule, ...], Routing, int]] = []
        prefixes: dict[int, Prefix] = {}
        for index, fixed in enumerate(state.beam):
            if options.prefix_cache:  # the fixed prefix runs once; each candidate starts at this layer
                prefixes[index] = evaluator.advance(evaluator.initial(), Routing(fixed), 0, layer), layer
            else:
                prefixes[index] = evaluator.initial(), 0
            screened += [
                (loss, rules, routing, index)
                for loss, rules, routing in _screen_layer(context, fixed, prefixes[index], layer, free)
            ]
        screened.sort(key=lambda item: item[0])  # stable: equal losses keep the order they were generated in
        scored = []
        for _, rules, routing, index in screened[: max(options.beam_width, options.finalists)]:
            metrics = evaluator.measure(prefixes[index][0], routing, prefixes[index][1])
            state.consider(routing, metrics)
            scored.append((metrics["loss"], rules))
        scored.sort(key=lambda item: item[0])
        state.beam = [rules for _, rules in scored[: options.beam_width]] or state.beam
        state.step = step + 1
        state.checkpoint(evaluator, context.path, started)
        bar.update(1)
    bar.close()
    if state.before_fill is None:  # saved only together with the filled routing, so an interrupted fill reruns
        started = time.perf_counter()
        fill_budget(context.model, evaluator, context.space, context.target, state, options.screen_images)
        state.checkpoint(evaluator, context.path, started)


def _screen_layer(
    context: SearchContext, fixed: tuple[Rule, ...], prefix: Prefix, layer: int, free: list[int]
) -> list[tuple[float, tuple[Rule, ...], Routing]]:
    """Every candidate rule at ``layer`` after the ``fixed`` rules, completed within budget and scored on the first
    ``screen_images`` images: first one probe per scorer, then every keep and reducer of the best scorers."""
    model, space, screened = context.model, context.space, []

    def screen(rule: Rule | None) -> float | None:
        rules = fixed + ((rule,) if rule is not None else ())
        routing = completion(model, rules, free, context.target)
        if routing is None:
            return None
        loss = context.evaluator.measure(prefix[0], routing, prefix[1], context.options.screen_images)["loss"]
        screened.append((loss, rules, routing))
        return loss

    class_token = model.has_class_token
    probes, shortlist = [], None
    if 0 < space.shortlist < len(space.usable_scorers(class_token)):
        probes = space.probes(layer, class_token)
        losses = {rule.score: screen(rule) for rule in probes}
        ranked = sorted((loss, scorer) for scorer, loss in losses.items() if loss is not None)
        shortlist = [scorer for _, scorer in ranked[: space.shortlist]]
    for rule in space.candidates(layer, class_token, shortlist, len(context.model.blocks)):
        if rule not in probes:
            screen(rule)
    return screened


def fill_budget(
    model: VisionTransformer,
    evaluator: Evaluator,
    space: SearchSpace,
    target: float,
    state: SearchState,
    screen_images: int | None = None,
) -> None:
    """Spend the budget the best routing leaves: make one rule milder at a time (the move with the lowest screened
    loss, ties to the more FLOPs), as long as the loss on all images does not rise and the routing stays within
    budget. Sets ``state.before_fill`` and leaves the filled routing in ``state.best``.

    A beam step that prunes hard early can leave little for the ToMe completion to remove, so the best routing found
    may use less than the budget, and giving tokens back rarely hurts.
    """
    best, metrics = state.best.routing, state.best.metrics
    state.before_fill = BeforeFill(metrics, count_flops(model, best))
    while True:
        moves = []
        for index, rule in enumerate(best.rules):
            softer = milder(rule, space)
            rules = best.rules[:index] + ((softer,) if softer is not None else ()) + best.rules[index + 1 :]
            routing = replace(best, rules=rules)
            flops = count_flops(model, routing)
            if flops <= target:
                loss = evaluator.measure(evaluator.initial(), routing, 0, screen_images)["loss"]
                moves.append((loss, -flops, index, routing))
        if not moves:
            break
        routing = min(moves, key=lambda move: move[:3])[3]
        confirmed = evaluator.measure(evaluator.initial(), routing, 0)
        if confirmed["loss"] > metrics["loss"]:
            break
        best, metrics = routing, confirmed
    state.best = Best(best, metrics)
