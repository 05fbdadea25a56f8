"""The ``beam`` strategy: decide one layer at a time, screen every candidate cheaply, confirm the best on all images.

A partial routing is completed by ToMe merging in the layers still undecided (:func:`completion`), so every candidate
is a complete routing within budget, and the first ones evaluated include ToMe itself. The token states of each fixed
prefix are cached, so a candidate at layer ``l`` runs only blocks ``l`` to the end. A last pass spends what the best
routing leaves of the budget, one milder rule at a time, while the objective does not get worse.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from attnprune.flops import count_flops
from attnprune.routing import Routing
from attnprune.search import state as search_state
from attnprune.search.evaluator import Evaluator
from attnprune.search.space import SearchSpace, completion, milder

__all__ = ["beam", "consider", "fill_budget"]


def consider(state: dict[str, Any], routing: Routing, metrics: dict[str, float]) -> None:
    """Make ``routing`` the best so far if its loss is strictly lower (the earlier candidate wins ties)."""
    if state["best"] is None or metrics["loss"] < state["best"]["metrics"]["loss"]:
        state["best"] = {"routing": routing.to_dict(), "metrics": metrics}


def beam(
    model: VisionTransformer,
    evaluator: Evaluator,
    space: SearchSpace,
    target: float,
    state: dict[str, Any],
    path: Path | None,
    progress: bool,
    beam_width: int,
    prefix_cache: bool,
    screen_images: int,
    finalists: int,
) -> dict[str, Any]:
    """Run (or resume) the beam search in ``state``; see the module docstring."""
    layers = space.pruning_layers(len(model.blocks))
    bar = tqdm(total=len(layers), initial=state["step"], desc="routing search (beam)", disable=not progress)
    for step in range(state["step"], len(layers)):
        started = time.perf_counter()
        layer, free = layers[step], layers[step + 1 :]
        screened: list[tuple[float, list[dict], Routing, int]] = []
        prefixes: dict[int, tuple[list, int]] = {}
        for index, fixed in enumerate(state["beam"]):
            if prefix_cache:  # the fixed prefix runs once; each candidate starts at this layer
                prefixes[index] = evaluator.advance(evaluator.initial(), Routing(tuple(fixed)), 0, layer), layer
            else:
                prefixes[index] = evaluator.initial(), 0
            screened += [
                (loss, rules, routing, index)
                for loss, rules, routing in _screen_layer(
                    model, evaluator, space, target, fixed, prefixes[index], layer, free, screen_images
                )
            ]
        screened.sort(key=lambda item: item[0])  # stable: equal losses keep the order they were generated in
        scored = []
        for _, rules, routing, index in screened[: max(beam_width, finalists)]:
            metrics = evaluator.measure(prefixes[index][0], routing, prefixes[index][1])
            consider(state, routing, metrics)
            scored.append((metrics["loss"], rules))
        scored.sort(key=lambda item: item[0])
        state["beam"] = [rules for _, rules in scored[:beam_width]] or state["beam"]
        state["step"] = step + 1
        search_state.checkpoint(state, evaluator, path, started)
        bar.update(1)
    bar.close()
    if "before_fill" not in state:  # saved only together with the filled routing, so an interrupted fill reruns
        started = time.perf_counter()
        fill_budget(model, evaluator, space, target, state, screen_images)
        search_state.checkpoint(state, evaluator, path, started)
    return state


def _screen_layer(
    model: VisionTransformer,
    evaluator: Evaluator,
    space: SearchSpace,
    target: float,
    fixed: list[dict],
    prefix: tuple[list, int],
    layer: int,
    free: list[int],
    screen_images: int,
) -> list[tuple[float, list[dict], Routing]]:
    """Every candidate rule at ``layer`` after the ``fixed`` rules, completed within budget and scored on the first
    ``screen_images`` images: first one probe per scorer, then every keep and reducer of the best scorers."""
    screened = []

    def screen(rule: dict | None) -> float | None:
        rules = fixed + ([rule] if rule is not None else [])
        routing = completion(model, rules, free, target)
        if routing is None:
            return None
        loss = evaluator.measure(prefix[0], routing, prefix[1], screen_images)["loss"]
        screened.append((loss, rules, routing))
        return loss

    class_token = model.has_class_token
    probes, shortlist = [], None
    if 0 < space.shortlist < len(space.usable_scorers(class_token)):
        probes = space.probes(layer, class_token)
        losses = {rule["score"]: screen(rule) for rule in probes}
        ranked = sorted((loss, scorer) for scorer, loss in losses.items() if loss is not None)
        shortlist = [scorer for _, scorer in ranked[: space.shortlist]]
    for rule in space.candidates(layer, class_token, shortlist):
        if rule not in probes:
            screen(rule)
    return screened


def fill_budget(
    model: VisionTransformer,
    evaluator: Evaluator,
    space: SearchSpace,
    target: float,
    state: dict[str, Any],
    screen_images: int | None = None,
) -> None:
    """Spend the budget the best routing leaves: make one rule milder at a time (the move with the lowest screened
    loss, ties to the more FLOPs), as long as the loss on all images does not rise and the routing stays within
    budget.

    A beam step that prunes hard early can leave little for the ToMe completion to remove, so the best routing found
    may use less than the budget, and giving tokens back rarely hurts.
    """
    best = Routing.from_dict(state["best"]["routing"])
    metrics = state["best"]["metrics"]
    state["before_fill"] = {"metrics": metrics, "flops": count_flops(model, best)}
    while True:
        moves = []
        for index in range(len(best.rules)):
            rules = [r.to_dict() for r in best.rules]
            softer = milder(rules[index], space)
            rules[index : index + 1] = [softer] if softer is not None else []
            routing = Routing.from_dict({**best.to_dict(), "rules": rules})
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
    state["best"] = {"routing": best.to_dict(), "metrics": metrics}
