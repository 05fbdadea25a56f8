"""Search the static routing with the best validation accuracy under a FLOPs budget.

Three strategies:

- ``beam``: decides one layer at a time, from the first block to the last. A partial routing is completed by
  ToMe-style merging in the layers still undecided, with the smallest uniform ``r`` that meets the budget, so every
  candidate evaluated is a complete routing within budget. The token states of each fixed prefix are cached, so a
  candidate at layer ``l`` runs only blocks ``l`` to the end. The first candidates evaluated include ToMe itself.
  A last pass spends what the best routing leaves of the budget, one milder rule at a time, while validation top-1
  does not fall.
- ``transition``: a non-attention scorer below depth ``t`` and class-token attention from ``t`` on, at every
  pruning layer, with the keep fraction tuned to the budget; searched over ``t``, the scorer and the reducer.
- ``label_free``: ``t`` and the scorer chosen from the selectivity analysis alone (oracle agreement needs no labels),
  keep tuned to the budget; labels, if present, only report its accuracy.

With ``holdout``, part of the validation set is kept out of the search. The routing found is checked on it against
the baselines within budget (ToMe, EViT, attention top-k): searching hundreds of candidates on the same images rewards
lucky ones, and the held-out images tell whether the winner's lead is real. If a baseline scores higher there, the
search returns that baseline.

The search is resumable: with ``state_path``, the state is saved after every step and a rerun continues from it.
A state is tied to the settings, every weight of the model and the searched images: any other search refuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from tqdm.auto import tqdm

from attnprune.flops import count_flops, matched_baselines
from attnprune.routing import Routing
from attnprune.scoring import SCORERS
from attnprune.vit import check_prunable, embed, head, num_patch_tokens, run_blocks

__all__ = ["SearchSpace", "SearchResult", "search_routing", "split_holdout", "InfeasibleBudget"]


class InfeasibleBudget(ValueError):
    """No routing of the search space meets the FLOPs budget."""


@dataclass(frozen=True)
class SearchSpace:
    """Candidate rules of the search.

    Attributes:
        scorers: scorers of ``drop`` and ``fuse`` rules.
        reducers: reducers tried (``merge`` takes its fraction from ``merge_keeps``).
        keeps: keep fractions of ``drop`` and ``fuse`` rules.
        merge_keeps: keep fractions of ``merge`` rules (bipartite matching keeps at least half).
        layers: blocks that may prune (default: all but the last).
        attention: the attention scorer of the ``transition`` strategies.
    """

    scorers: tuple[str, ...] = ("cls_attention", "l2_norm", "std", "distinctiveness", "redundancy")
    reducers: tuple[str, ...] = ("drop", "fuse", "merge")
    keeps: tuple[float, ...] = (0.6, 0.8, 0.9)
    merge_keeps: tuple[float, ...] = (0.75, 0.9)
    layers: tuple[int, ...] | None = None
    attention: str = "cls_attention"

    def candidates(self, layer: int, class_token: bool) -> list[dict[str, Any] | None]:
        """Rules to try at ``layer``; None is "no rule"."""
        rules: list[dict[str, Any] | None] = [None]
        scorers = [s for s in self.scorers if class_token or not SCORERS[s].needs_class_token]
        for reduce in self.reducers:
            if reduce == "merge":
                rules += [{"layer": layer, "keep": k, "reduce": "merge"} for k in self.merge_keeps]
            else:
                rules += [
                    {"layer": layer, "score": s, "keep": k, "reduce": reduce} for s in scorers for k in self.keeps
                ]
        return rules


@dataclass
class SearchResult:
    """The routing found and how it was found (validation top-1, FLOPs, candidates, forwards, wall time)."""

    routing: Routing
    report: dict[str, Any] = field(default_factory=dict)


def _batches_for(labels: list[Tensor], images: int) -> int:
    """How many leading batches hold ``images`` images (at least one)."""
    total = 0
    for count, batch in enumerate(labels, start=1):
        total += len(batch)
        if total >= images:
            return count
    return len(labels)


class _Evaluator:
    """Validation accuracy of routings, from cached token states of fixed prefixes."""

    def __init__(self, model: VisionTransformer, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.model, self.labels = model, [labels for _, labels in batches]
        self.raw = [images for images, _ in batches]
        with torch.no_grad():
            self.inputs = [embed(model, images) for images, _ in batches]
        self.images = sum(len(labels) for labels in self.labels)
        self.block_passes = 0  # blocks run over the whole validation set
        self.candidates = 0

    def plans(self, routing: Routing) -> dict:
        tokens = self.inputs[0].shape[1] - self.model.num_prefix_tokens
        return {plan.rule.layer: plan for plan in routing.resolve(len(self.model.blocks), tokens)}

    @torch.no_grad()
    def advance(self, states: list[tuple[Tensor, Tensor | None]], routing: Routing, start: int, stop: int):
        """Token states after blocks ``start``..``stop - 1`` under ``routing``."""
        plans = self.plans(routing)
        self.block_passes += stop - start
        return [run_blocks(self.model, x, size, routing, plans, start, stop) for x, size in states]

    @torch.no_grad()
    def accuracy(
        self, states: list[tuple[Tensor, Tensor | None]], routing: Routing, start: int, images: int | None = None
    ) -> float:
        """Top-1 of ``routing`` finishing from ``states`` at block ``start``, on all images or on the batches that
        hold the first ``images``."""
        self.candidates += 1
        count = len(states) if images is None else _batches_for(self.labels, images)
        done = self.advance(states[:count], routing, start, len(self.model.blocks))
        labels = self.labels[:count]
        correct = sum(
            (head(self.model, self.model.norm(x), size).argmax(-1) == y).sum().item()
            for (x, size), y in zip(done, labels, strict=True)
        )
        return correct / sum(len(y) for y in labels)

    def initial(self) -> list[tuple[Tensor, Tensor | None]]:
        return [(x, None) for x in self.inputs]


def _fingerprint(
    model: VisionTransformer, budget: float, space: SearchSpace, strategy: str, evaluator: _Evaluator
) -> str:
    """Identifies a search: its settings, every weight of the model and the searched images and labels, so that a
    state saved for another model (even one differing only in its head) or other data is never resumed."""
    digest = hashlib.sha256(json.dumps([budget, asdict(space), strategy], sort_keys=True, default=str).encode())
    for tensor in [*model.state_dict().values(), *evaluator.raw, *evaluator.labels]:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _completion(
    model: VisionTransformer,
    fixed: list[dict],
    first_free: int,
    layers: list[int],
    target: float,
    prop_attn: bool = True,
) -> Routing | None:
    """``fixed`` rules plus uniform merging in the free ``layers`` (from ``first_free`` on) with the smallest r that
    meets ``target`` FLOPs; None if even the largest r does not."""
    free = [layer for layer in layers if layer >= first_free]
    tokens = num_patch_tokens(model)
    for r in range(0, tokens // 2 + 1):
        rules = fixed + [{"layer": layer, "r": r, "reduce": "merge"} for layer in free] if r else fixed
        routing = Routing(tuple(rules), name="searched", prop_attn=prop_attn)
        try:
            flops = count_flops(model, routing)
        except ValueError:
            return None
        if flops <= target:
            return routing
        if not free:
            return None
    return None


def _tune_keep(model: VisionTransformer, make, target: float) -> Routing | None:
    """The largest keep fraction (in steps of 0.01) whose routing ``make(keep)`` meets ``target`` FLOPs."""
    for keep in [round(1.0 - 0.01 * i, 2) for i in range(0, 96)]:
        routing = make(keep)
        if count_flops(model, routing) <= target:
            return routing
    return None


def cheapest_flops(model: VisionTransformer, space: SearchSpace) -> int:
    """FLOPs of the most aggressive routing the space can express (every layer at its smallest keep)."""
    layers = list(space.layers if space.layers is not None else range(len(model.blocks) - 1))
    options = []
    if space.keeps and any(r != "merge" for r in space.reducers):
        scorer = "l2_norm" if "l2_norm" in space.scorers else space.scorers[0]
        options.append(Routing(tuple({"layer": layer, "score": scorer, "keep": min(space.keeps)} for layer in layers)))
    if "merge" in space.reducers:
        tokens = num_patch_tokens(model)
        options.append(Routing(tuple({"layer": layer, "r": tokens, "reduce": "merge"} for layer in layers)))
    return min(count_flops(model, routing) for routing in options)


def _load_state(path: Path | None, fingerprint: str) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"search state {path} belongs to another search (model, data, budget or space differ); "
            "delete it or pass another state_path"
        )
    return state


def _save_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)  # atomic: a kill never leaves half a state


def search_routing(
    model: VisionTransformer,
    dataloader: Iterable[tuple[Tensor, Tensor]],
    budget: float,
    *,
    space: SearchSpace | None = None,
    strategy: str = "beam",
    state_path: str | Path | None = None,
    beam_width: int = 2,
    prefix_cache: bool = True,
    screen_images: int = 1000,
    finalists: int = 4,
    holdout: float = 0.0,
    progress: bool = True,
) -> SearchResult:
    """Find the routing with the best validation top-1 whose FLOPs are within ``budget``.

    Args:
        model: a timm ViT in eval mode (its own routing, if any, is ignored).
        dataloader: validation ``(images, labels)`` batches, preprocessed for the model (never the test split).
        budget: FLOPs budget as a fraction of the unpruned model's (``count_flops(routing) <= budget * unpruned``).
        space: candidate rules (default :class:`SearchSpace`).
        strategy: ``beam``, ``transition`` or ``label_free``.
        state_path: JSON file saving the search as it goes; rerunning with it continues where it stopped.
        beam_width: partial routings kept per layer (``beam``).
        prefix_cache: reuse the token states of each fixed prefix (``beam``); off, every candidate runs from the
            input (for measuring what the cache saves: the result is the same).
        screen_images: ``beam`` first scores every candidate on the batches holding this many images,
        finalists: then measures the ``finalists`` best of them (at least ``beam_width``) on all images; only those
            full measurements rank the beam and the result.
        holdout: fraction of the validation batches (the last ones) kept out of the search, to check the routing
            found against the baselines within budget; the best of them on these batches is returned.
            0 searches on every batch and checks nothing.
        progress: show a progress bar.

    Returns:
        The routing and a report: validation top-1 (on the images searched), FLOPs, FLOPs ratio, candidates
        evaluated, block passes (blocks run over the validation set), images, wall time, and with ``holdout`` the
        check (``check``: each candidate's top-1 on the held-out images, which was returned, and the routing the
        search found, whether returned or not).

    Raises:
        InfeasibleBudget: no routing of the space meets the budget (the message gives the cheapest reachable).
    """
    if strategy not in ("beam", "transition", "label_free"):
        raise ValueError(f"unknown search strategy {strategy!r} (known: beam, transition, label_free)")
    space = space or SearchSpace()
    check_prunable(model, Routing())
    unpruned = count_flops(model, Routing())
    target = budget * unpruned
    cheapest = cheapest_flops(model, space)
    if cheapest > target:
        raise InfeasibleBudget(
            f"budget {budget:g} ({target / 1e9:.4g} GFLOPs) is below the cheapest routing the search space reaches: "
            f"{cheapest / 1e9:.4g} GFLOPs ({cheapest / unpruned:.1%} of the unpruned model)"
        )
    start = time.perf_counter()
    batches = [(images, labels) for images, labels in dataloader]
    searched, held_out = split_holdout(batches, holdout)
    evaluator = _Evaluator(model, searched)
    path = Path(state_path) if state_path is not None else None
    fingerprint = _fingerprint(model, budget, space, strategy, evaluator)
    state = _load_state(path, fingerprint) or {
        "fingerprint": fingerprint,
        "step": 0,
        "beam": [[]],
        "best": None,
        "candidates": 0,
        "block_passes": 0,
        "seconds": 0.0,
    }
    previous_seconds = state["seconds"]  # time spent before an interruption, when resuming
    run = {"beam": _beam, "transition": _transition, "label_free": _label_free}[strategy]
    options = {
        "beam_width": beam_width,
        "prefix_cache": prefix_cache,
        "screen_images": screen_images,
        "finalists": finalists,
    }
    state = run(model, evaluator, space, target, state, path, progress, **options)
    routing, top1 = Routing.from_dict(state["best"]["routing"]), state["best"]["top1"]
    if held_out:
        checker = _Evaluator(model, held_out)
        routing, check = _check(model, checker, routing, target)
        if check["returned"] != "searched":  # report the baseline's top-1 on the searched images too
            top1 = evaluator.accuracy(evaluator.initial(), routing, 0)
        evaluator.candidates += checker.candidates
        evaluator.block_passes += checker.block_passes
    seconds = previous_seconds + time.perf_counter() - start
    flops = count_flops(model, routing)
    report = {
        "strategy": strategy,
        "budget": budget,
        "val_top1": top1,
        "flops": flops,
        "flops_ratio": flops / unpruned,
        "candidates_evaluated": state["candidates"] + evaluator.candidates,
        "block_passes": state["block_passes"] + evaluator.block_passes,
        "full_forward_equivalents": (state["block_passes"] + evaluator.block_passes) / len(model.blocks),
        "images": evaluator.images,
        "wall_time_s": seconds,
    }
    if "before_fill" in state:
        report["before_fill"] = {
            "val_top1": state["before_fill"]["val_top1"],
            "flops_ratio": state["before_fill"]["flops"] / unpruned,
        }
    if held_out:
        report["check"] = check
    return SearchResult(routing, report)


def split_holdout(batches: list, holdout: float) -> tuple[list, list]:
    """The validation batches searched on and the last ``holdout`` fraction of them kept out to check the result."""
    count = round(holdout * len(batches))
    if not 0 <= holdout < 1 or (holdout > 0 and not 0 < count < len(batches)):
        raise ValueError(
            f"holdout {holdout:g} of {len(batches)} validation batches leaves {len(batches) - count} to search on "
            f"and {count} to check on; it must be in [0, 1) and leave at least one batch for each"
        )
    return batches[: len(batches) - count], batches[len(batches) - count :]


def _check(model, held_out, routing, target) -> tuple[Routing, dict[str, Any]]:
    """The routing found and the baselines within budget, all measured on the held-out images; the best there is
    returned (the routing found on ties)."""
    candidates = {"searched": routing, **matched_baselines(model, target, within=True)}
    candidates.pop("random")
    scores = {m: held_out.accuracy(held_out.initial(), r, 0) for m, r in candidates.items()}
    method = max(scores, key=scores.get)  # the first maximum: the routing found wins ties
    check = {"holdout_images": held_out.images, "holdout_top1": scores, "returned": method}
    return candidates[method], {**check, "searched_routing": routing.to_dict()}


def _consider(state: dict[str, Any], routing: Routing, top1: float) -> None:
    if state["best"] is None or top1 > state["best"]["top1"]:
        state["best"] = {"routing": routing.to_dict(), "top1": top1}


def _checkpoint(state: dict[str, Any], evaluator: _Evaluator, path: Path | None, started: float) -> None:
    state["candidates"] += evaluator.candidates
    state["block_passes"] += evaluator.block_passes
    state["seconds"] += time.perf_counter() - started
    evaluator.candidates = evaluator.block_passes = 0
    _save_state(path, state)


def _beam(model, evaluator, space, target, state, path, progress, beam_width, prefix_cache, screen_images, finalists):
    depth = len(model.blocks)
    layers = list(space.layers if space.layers is not None else range(depth - 1))
    bar = tqdm(total=len(layers), initial=state["step"], desc="routing search (beam)", disable=not progress)
    prefixes: dict[int, tuple[list, int]] = {}
    for step in range(state["step"], len(layers)):
        started = time.perf_counter()
        layer = layers[step]
        screened = []
        for index, fixed in enumerate(state["beam"]):
            if prefix_cache:  # the fixed prefix runs once; each candidate starts at this layer
                prefixes[index] = evaluator.advance(evaluator.initial(), Routing(tuple(fixed)), 0, layer), layer
            else:
                prefixes[index] = evaluator.initial(), 0
            states, begin = prefixes[index]
            for rule in space.candidates(layer, model.has_class_token):
                rules = fixed + ([rule] if rule is not None else [])
                routing = _completion(model, rules, layer + 1, layers, target)
                if routing is not None:
                    screened.append((evaluator.accuracy(states, routing, begin, screen_images), rules, routing, index))
        # Every candidate is screened on the first images; the most promising are measured on all of them.
        screened.sort(key=lambda item: -item[0])
        scored = []
        for _, rules, routing, index in screened[: max(beam_width, finalists)]:
            states, begin = prefixes[index]
            top1 = evaluator.accuracy(states, routing, begin)
            _consider(state, routing, top1)
            scored.append((top1, rules))
        prefixes.clear()
        scored.sort(key=lambda item: -item[0])
        state["beam"] = [rules for _, rules in scored[:beam_width]] or state["beam"]
        state["step"] = step + 1
        _checkpoint(state, evaluator, path, started)
        bar.update(1)
    bar.close()
    if "before_fill" not in state:  # saved only together with the filled routing, so an interrupted fill reruns
        started = time.perf_counter()
        _fill_budget(model, evaluator, space, target, state)
        _checkpoint(state, evaluator, path, started)
    return state


def _milder(rule: dict[str, Any], space: SearchSpace) -> dict[str, Any] | None:
    """The next milder version of ``rule`` (fewer tokens removed); None: no rule at that layer."""
    if "r" in rule:
        return {**rule, "r": rule["r"] - 1} if rule["r"] > 1 else None
    keeps = [k for k in (space.merge_keeps if rule["reduce"] == "merge" else space.keeps) if k > rule["keep"]]
    return {**rule, "keep": min(keeps)} if keeps else None


def _fill_budget(model, evaluator, space, target, state) -> None:
    """Spend the budget the best routing leaves: make one rule milder at a time (the move with the best validation
    top-1, ties to the more FLOPs), as long as top-1 does not fall and the routing stays within budget.

    A beam step that prunes hard early can leave nothing for the ToMe completion to remove, so the best routing
    found may use far less than the budget; with noisy validation accuracy, giving tokens back rarely hurts.
    """
    best = Routing.from_dict(state["best"]["routing"])
    top1 = state["best"]["top1"]
    state["before_fill"] = {"val_top1": top1, "flops": count_flops(model, best)}
    while True:
        moves = []
        for index in range(len(best.rules)):
            rules = [r.to_dict() for r in best.rules]
            milder = _milder(rules[index], space)
            rules[index : index + 1] = [milder] if milder is not None else []
            routing = Routing.from_dict({**best.to_dict(), "rules": rules})
            flops = count_flops(model, routing)
            if flops <= target:
                moves.append((evaluator.accuracy(evaluator.initial(), routing, 0), flops, routing))
        if not moves:
            break
        accuracy, _, routing = max(moves, key=lambda move: move[:2])
        if accuracy < top1:
            break
        best, top1 = routing, accuracy
    state["best"] = {"routing": best.to_dict(), "top1": top1}


def _transition_routing(model, layers, t, scorer, attention, reduce, keep):
    rules = tuple(
        {"layer": layer, "score": scorer if layer < t else attention, "keep": keep, "reduce": reduce}
        for layer in layers
    )
    return Routing(rules, name=f"transition-t{t}-{scorer}-{reduce}")


def _transition(model, evaluator, space, target, state, path, progress, **_):
    depth = len(model.blocks)
    layers = list(space.layers if space.layers is not None else range(depth - 1))
    low = [s for s in space.scorers if SCORERS[s].family != "attention"] or ["l2_norm"]
    reducers = [r for r in space.reducers if r != "merge"] or ["drop"]
    grid = [(t, s, r) for r in reducers for s in low for t in range(0, depth + 1) if not (t == 0 and s != low[0])]
    bar = tqdm(total=len(grid), initial=state["step"], desc="routing search (transition)", disable=not progress)
    for step in range(state["step"], len(grid)):
        started = time.perf_counter()
        t, scorer, reduce = grid[step]
        routing = _tune_keep(
            model, partial(_transition_routing, model, layers, t, scorer, space.attention, reduce), target
        )
        if routing is not None:
            _consider(state, routing, evaluator.accuracy(evaluator.initial(), routing, 0))
        state["step"] = step + 1
        _checkpoint(state, evaluator, path, started)
        bar.update(1)
    bar.close()
    if state["best"] is None:
        raise InfeasibleBudget("no transition routing meets the budget; widen the space or raise the budget")
    return state


def _label_free(model, evaluator, space, target, state, path, progress, analysis_images=256, **_):
    from attnprune.selectivity import SelectivityAnalyzer
    from attnprune.selectivity.analysis import attention_transition_depth

    started = time.perf_counter()
    depth = len(model.blocks)
    layers = list(space.layers if space.layers is not None else range(depth - 1))
    low = [s for s in space.scorers if SCORERS[s].family != "attention"] or ["l2_norm"]
    analyzer = SelectivityAnalyzer(depth, model.has_class_token, scorers=[*low, space.attention])
    seen = 0
    for batch in evaluator.raw:  # the oracle needs no labels: only the images
        analyzer.update(model, batch[: analysis_images - seen])
        seen += min(len(batch), analysis_images - seen)
        if seen >= analysis_images:
            break
    results = analyzer.compute()
    t = attention_transition_depth(results, space.attention)
    t = depth if t is None else t
    below = [layer for layer in range(depth) if layer < max(t, 1)]
    scorer = max(low, key=lambda s: sum(results[f"reliability_spearman_{s}"][i] for i in below))
    reduce = "fuse" if "fuse" in space.reducers else "drop"
    routing = _tune_keep(model, partial(_transition_routing, model, layers, t, scorer, space.attention, reduce), target)
    if routing is None:
        raise InfeasibleBudget("the label-free routing cannot meet the budget; raise the budget")
    top1 = evaluator.accuracy(evaluator.initial(), routing, 0) if evaluator.labels else math.nan
    _consider(state, routing, top1)
    state["step"] = 1
    state["transition_depth"] = t
    _checkpoint(state, evaluator, path, started)
    return state
