"""Analytic FLOPs of a (pruned) timm ViT.

One convention throughout: a multiply-accumulate is one FLOP (fvcore's), under which DeiT-S/16 at 224 px is 4.6
GFLOPs. The count follows the per-layer token counts of the routing and includes the scorers' and reducers' own
work; element-wise work outside them (norms, activations, softmax) is not counted, as in fvcore.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from attnprune.routing import LayerPlan, Routing, as_routing
from attnprune.scoring import SCORERS
from attnprune.vit import check_prunable, num_patch_tokens

__all__ = ["count_flops", "match_flops", "matched_baselines", "reducer_flops"]


def _linear_macs(module: nn.Module | None) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def reducer_flops(plan: LayerPlan, tokens: int, dim: int, head_dim: int) -> int:
    """Multiply-accumulates of a reducer on ``tokens`` tokens (prefix included) of width ``dim``."""
    if plan.n_out == plan.n_in:
        return 0
    if plan.rule.reduce == "merge":  # cosine matching of set A against set B on the head-averaged keys, then averaging
        return math.ceil(tokens / 2) * (tokens // 2) * head_dim + 2 * tokens * dim
    if plan.rule.reduce == "fuse":  # score-weighted average of the dropped tokens
        return (plan.n_in - plan.n_keep) * dim
    return 0


def count_flops(model: VisionTransformer, routing: Routing | None = None, img_size: int | None = None) -> int:
    """Multiply-accumulates per image of ``model`` under ``routing``, computed on paper.

    Args:
        model: a timm ``VisionTransformer`` (need not be pruned: the routing is applied on paper).
        routing: the routing; default the one :func:`attnprune.prune` attached, else none.
        img_size: input side (or ``(h, w)``); default the model's own input size.

    Returns:
        FLOPs per image (one multiply-accumulate = one FLOP).
    """
    routing = as_routing(routing)
    if routing is None:
        routing = getattr(model, "routing", None) or Routing()
    check_prunable(model, routing)
    if model.attn_pool is not None:
        raise ValueError("count_flops does not model attention-pool heads (global_pool='map')")
    prefix, depth = model.num_prefix_tokens, len(model.blocks)
    patches = num_patch_tokens(model, img_size)
    plans = {plan.rule.layer: plan for plan in routing.resolve(depth, patches)}
    counts = routing.token_counts(depth, patches)

    total = patches * model.patch_embed.proj.weight.numel()
    for i, block in enumerate(model.blocks):
        attn = block.attn
        t_in = counts[i] + prefix
        t_out = counts[i + 1] + prefix
        total += t_in * _linear_macs(attn) + 2 * t_in * t_in * attn.attn_dim
        plan = plans.get(i)
        if plan is not None and plan.n_out != plan.n_in:
            if plan.rule.score is not None:
                total += SCORERS[plan.rule.score].flops(t_in, model.embed_dim, attn.num_heads)
            total += reducer_flops(plan, t_in, model.embed_dim, attn.head_dim)
        total += t_out * _linear_macs(block.mlp)
    total += _linear_macs(model.head) + _linear_macs(getattr(model, "head_dist", None))
    return int(total)


def match_flops(
    model: VisionTransformer, make: Callable[[float], Routing], knobs: Iterable[float], ratio: float
) -> Routing:
    """Of the routings ``make(knob)``, the one whose FLOPs are closest to ``ratio`` times the unpruned model's.

    Used to compare methods at equal FLOPs: ``match_flops(model, lambda r: Routing.tome(int(r), 12), range(1, 25),
    0.65)`` tunes ToMe's r to 65% of the FLOPs. Knobs whose routing does not fit the model (for example an r
    larger than bipartite matching can merge in the last blocks) are not candidates.

    Raises:
        ValueError: no knob gives a routing that fits the model (the message names the knobs and the last error).
    """
    target = ratio * count_flops(model, Routing())
    candidates, error, knobs = [], None, list(knobs)
    for knob in knobs:
        routing = make(knob)
        try:
            candidates.append((abs(count_flops(model, routing) - target), routing))
        except ValueError as err:
            error = err
    if not candidates:
        raise ValueError(f"match_flops: none of the knobs {knobs} gives a routing that fits the model (last: {error})")
    return min(candidates, key=lambda item: item[0])[1]


def baseline_layers(depth: int) -> tuple[int, ...]:
    """EViT's three pruning layers (3, 6 and 9 of 12 blocks) scaled to ``depth`` blocks (fewer on shallow models,
    never beyond the last block)."""
    return tuple(sorted({min(depth - 1, max(1, round(depth * f))) for f in (0.25, 0.5, 0.75)}))


def matched_baselines(model: VisionTransformer, target: float, within: bool = False) -> dict[str, Routing]:
    """ToMe, EViT, uniform attention top-k and random, each tuned to ``target`` FLOPs (absolute).

    ToMe's r may differ by one between blocks (``[r + 1] * m + [r] * (depth - m)``) and the keep fractions move in
    steps of 0.005, so the match is usually within 1%. With ``within``, each is the routing with the most FLOPs not
    above ``target`` instead of the closest, and a method that cannot get under ``target`` is left out. EViT and
    attention top-k rank tokens by class-token attention, so a model without a class token has neither.
    """
    depth, layers = len(model.blocks), baseline_layers(len(model.blocks))
    keeps = [k / 1000 for k in range(200, 1001, 5)]
    tokens = num_patch_tokens(model)  # ToMe's r capped where matching cannot merge that many, as ToMe caps it
    families = {
        "tome": [
            Routing.tome([r + 1] * m + [r] * (depth - m), depth, num_tokens=tokens)
            for r in range(0, 24)
            for m in range(depth)
        ],
        "evit": [Routing.evit(k, layers) for k in keeps],
        "topk_attention": [Routing.topk_attention(k, layers) for k in keeps],
        "random": [Routing.random(k, layers, seed=0) for k in keeps],
    }
    if not model.has_class_token:
        del families["evit"], families["topk_attention"]
    tuned = {}
    for method, routings in families.items():
        flops = [(count_flops(model, routing), routing) for routing in routings]
        if within:
            fitting = [item for item in flops if item[0] <= target]
            if fitting:
                tuned[method] = max(fitting, key=lambda item: item[0])[1]
        else:
            tuned[method] = min(flops, key=lambda item: abs(item[0] - target))[1]
    return tuned
