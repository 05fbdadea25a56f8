"""The candidate rules of the routing search and the routings that complete a partial choice within budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from timm.models.vision_transformer import VisionTransformer

from attnprune.errors import UserError
from attnprune.flops import count_flops
from attnprune.reduction import REDUCERS
from attnprune.routing import Routing, Rule, max_merge
from attnprune.scoring import SCORERS
from attnprune.vit import num_patch_tokens

__all__ = [
    "SearchSpace",
    "InfeasibleBudget",
    "cheapest_flops",
    "completion",
    "tune_keep",
    "milder",
    "transition_routing",
]


class InfeasibleBudget(UserError):
    """No routing of the search space meets the FLOPs budget."""


@dataclass(frozen=True)
class SearchSpace:
    """Candidate rules of the search.

    Attributes:
        scorers: scorers of the reducers that rank tokens by a score (``drop``, ``fuse``, ``absorb``).
        reducers: reducers tried; those that match tokens instead of scoring them (``merge``, ToMe's r chosen per
            layer, and PiToMe's ``energy_merge``) take their fractions from ``merge_keeps``. By default the 2022
            moves (``drop``, EViT's ``fuse``, ToMe's ``merge``) and the peers' (DiffRate's ``absorb``, PiToMe's
            ``energy_merge``), which judged on validation images the search did not see raised its lead over the
            best baseline at 60% of the FLOPs (``benchmarks/check_policy.py --reducers``; docs/search.md).
        keeps: keep fractions of the scoring reducers' rules.
        merge_keeps: keep fractions of the matching reducers' rules (bipartite matching keeps at least half).
        layers: blocks that may prune (default: all but the last).
        attention: the attention scorer of the ``transition`` strategies.
        shortlist: at each layer the beam first tries every scorer once (``drop`` at the median keep) and expands
            only the ``shortlist`` best over every keep and reducer; 0 expands them all.
    """

    scorers: tuple[str, ...] = ("cls_attention", "l2_norm", "std", "distinctiveness", "redundancy")
    reducers: tuple[str, ...] = ("drop", "fuse", "merge", "absorb", "energy_merge")
    keeps: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    merge_keeps: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    layers: tuple[int, ...] | None = None
    attention: str = "cls_attention"
    shortlist: int = 2

    def pruning_layers(self, depth: int) -> list[int]:
        """The blocks that may prune in a model of ``depth`` blocks."""
        return list(self.layers if self.layers is not None else range(depth - 1))

    def usable_scorers(self, class_token: bool) -> list[str]:
        """The scorers that apply to a model with (or without) a class token."""
        return [s for s in self.scorers if class_token or not SCORERS[s].needs_class_token]

    def non_attention_scorers(self) -> list[str]:
        """The scorers below the transition depth of the ``transition`` strategies (``l2_norm`` if none)."""
        return [s for s in self.scorers if SCORERS[s].family != "attention"] or ["l2_norm"]

    def probes(self, layer: int, class_token: bool) -> list[Rule]:
        """One ``drop`` rule per scorer at the median keep: the cheap first look that shortlists scorers."""
        if not self.keeps or "drop" not in self.reducers and "fuse" not in self.reducers:
            return []
        keep = sorted(self.keeps)[len(self.keeps) // 2]
        reduce = "drop" if "drop" in self.reducers else "fuse"
        return [Rule(layer, score=s, keep=keep, reduce=reduce) for s in self.usable_scorers(class_token)]

    def candidates(
        self, layer: int, class_token: bool, scorers: list[str] | None = None, depth: int | None = None
    ) -> list[Rule | None]:
        """Rules to try at ``layer`` of a ``depth``-block model (None is "no rule"), the scoring reducers limited to
        ``scorers`` if given."""
        rules: list[Rule | None] = [None]
        scorers = self.usable_scorers(class_token) if scorers is None else scorers
        for reduce in self.reducers:
            options = _default_options(reduce, layer, depth)
            if REDUCERS[reduce].takes_score:
                rules += [Rule(layer, score=s, keep=k, reduce=reduce, **options) for s in scorers for k in self.keeps]
            else:
                rules += [Rule(layer, keep=k, reduce=reduce, **options) for k in self.merge_keeps]
        return rules


def completion(model: VisionTransformer, fixed: Sequence[Rule], free: list[int], target: float) -> Routing | None:
    """``fixed`` rules plus ToMe merging in the ``free`` layers with the fewest tokens removed that meets ``target``
    FLOPs; None if even the most merging does not.

    As in :func:`attnprune.routing.baselines.matched_baselines`, r may be one larger in the first free layers than in
    the rest (``[r + 1] * m + [r] * (len(free) - m)``), so the completion spends the budget as closely as ToMe itself
    can.
    """

    depth, tokens, fixed = len(model.blocks), num_patch_tokens(model), tuple(fixed)

    def merged(step: int) -> Routing:  # step = r * len(free) + m
        r, extra = divmod(step, len(free)) if free else (0, 0)
        schedule = [r + 1] * extra + [r] * (len(free) - extra)
        merges: tuple[Rule, ...] = ()
        for layer, n in sorted(zip(free, schedule, strict=True)):
            # as the official ToMe does, a layer merges at most what bipartite matching allows (stated, not clipped)
            n = min(n, max_merge(Routing(fixed + merges).token_counts(depth, tokens)[layer]))
            if n:
                merges += (Rule(layer, r=n, reduce="merge"),)
        return Routing(fixed + merges, name="searched")

    def flops(step: int) -> int:
        return count_flops(model, merged(step))

    low = tokens // 2 * len(free)  # the most merging: every free layer merges all it can
    if flops(low) > target:
        return None
    first = 0
    while first < low:  # more merging, fewer FLOPs: bisect for the first step within budget
        mid = (first + low) // 2
        first, low = (first, mid) if flops(mid) <= target else (mid + 1, low)
    return merged(first)


def tune_keep(model: VisionTransformer, make: Callable[[float], Routing], target: float) -> Routing | None:
    """The largest keep fraction (in steps of 0.01) whose routing ``make(keep)`` meets ``target`` FLOPs."""
    for keep in [round(1.0 - 0.01 * i, 2) for i in range(0, 96)]:
        routing = make(keep)
        if count_flops(model, routing) <= target:
            return routing
    return None


def cheapest_flops(model: VisionTransformer, space: SearchSpace) -> int:
    """FLOPs of the most aggressive routing the space can express (every layer at its smallest keep)."""
    layers = space.pruning_layers(len(model.blocks))
    options = []
    if space.keeps and any(r != "merge" for r in space.reducers):
        scorer = "l2_norm" if "l2_norm" in space.scorers else space.scorers[0]
        options.append(Routing(tuple(Rule(layer, score=scorer, keep=min(space.keeps)) for layer in layers)))
    if "merge" in space.reducers:  # as much as bipartite matching can merge in every layer
        tokens, merges = num_patch_tokens(model), []
        for layer in sorted(layers):
            merges.append(Rule(layer, r=max_merge(tokens), reduce="merge"))
            tokens -= merges[-1].r
        options.append(Routing(tuple(merges)))
    return min(count_flops(model, routing) for routing in options)


def milder(rule: Rule, space: SearchSpace) -> Rule | None:
    """The next milder version of ``rule`` (fewer tokens removed); None: no rule at that layer."""
    if rule.r is not None:
        return replace(rule, r=rule.r - 1) if rule.r > 1 else None
    keeps = [k for k in (space.keeps if REDUCERS[rule.reduce].takes_score else space.merge_keeps) if k > rule.keep]
    return replace(rule, keep=min(keeps)) if keeps else None


def _default_options(reduce: str, layer: int, depth: int | None) -> dict[str, float]:
    """The options a reducer requires, as its method sets them: PiToMe's energy margin falls with depth."""
    if "margin" in REDUCERS[reduce].required:
        if depth is None:
            raise UserError(f"search candidates of reduce {reduce!r} need the model's depth (its margin follows it)")
        return {"margin": 0.75 - 0.75 * (layer / depth)}
    missing = sorted(REDUCERS[reduce].required)
    if missing:
        raise UserError(f"the search space cannot try reduce {reduce!r}: it needs {missing[0]}, which has no default")
    return {}


def transition_routing(layers: list[int], t: int, scorer: str, attention: str, reduce: str, keep: float) -> Routing:
    """``scorer`` in the pruning ``layers`` below ``t``, ``attention`` from ``t`` on, all at one keep fraction: the
    routings of the ``transition`` strategies."""
    rules = tuple(Rule(layer, score=scorer if layer < t else attention, keep=keep, reduce=reduce) for layer in layers)
    return Routing(rules, name=f"transition-t{t}-{scorer}-{reduce}")
