"""The baselines tuned to a FLOPs budget, for comparisons at equal FLOPs: ToMe's r schedule, EViT's, attention
top-k's and the random control's keep fractions, PiToMe's ratio and PPT's r (with its variance threshold calibrated on
images), chosen so that each routing's FLOPs match a target."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from attnprune.errors import UserError, check_number
from attnprune.flops import count_flops
from attnprune.routing.core import Routing, baseline_layers
from attnprune.scoring import SCORERS, ScoreContext
from attnprune.vit import attend, embed, num_patch_tokens, run_blocks

__all__ = ["match_flops", "matched_baselines", "ppt_threshold"]


def match_flops(
    model: VisionTransformer, make: Callable[[float], Routing], knobs: Iterable[float], ratio: float
) -> Routing:
    """Of the routings ``make(knob)``, the one whose FLOPs are closest to ``ratio`` times the unpruned model's.

    Used to compare methods at equal FLOPs: ``match_flops(model, lambda r: Routing.tome(int(r), 12), range(1, 25),
    0.65)`` tunes ToMe's r to 65% of the FLOPs. Knobs whose routing does not fit the model (for example an r
    larger than bipartite matching can merge in the last blocks) are not candidates.

    Raises:
        UserError: ``ratio`` is not a fraction in (0, 1], or no knob gives a routing that fits the model (the message
            names the knobs and the last error).

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
        >>> match_flops(model, lambda r: Routing.tome(int(r), 4), range(1, 16), 0.7).name
        'tome-r9'
    """
    check_number("match_flops ratio (of the unpruned FLOPs)", ratio, 0, 1, low_open=True)
    target = ratio * count_flops(model, Routing())
    candidates, error, knobs = [], None, list(knobs)
    for knob in knobs:
        routing = make(knob)
        try:
            candidates.append((abs(count_flops(model, routing) - target), routing))
        except ValueError as err:
            error = err
    if not candidates:
        raise UserError(f"match_flops: none of the knobs {knobs} gives a routing that fits the model (last: {error})")
    return min(candidates, key=lambda item: item[0])[1]


def matched_baselines(
    model: VisionTransformer, target: float, within: bool = False, calibration: Tensor | None = None
) -> dict[str, Routing]:
    """ToMe, EViT, uniform attention top-k, PiToMe, PPT and random, each tuned to ``target`` FLOPs (absolute).

    ToMe's r may differ by one between blocks, the larger values in the first or in the last blocks
    (``[r + 1] * m + [r] * (depth - m)`` or the reverse: a token merged late costs less than one merged early, so
    the match is finer); the keep fractions and PiToMe's ratio move in steps of 0.005, so the match is usually within
    1%. With ``within``, each is the routing with the most FLOPs not above ``target`` instead of the closest, and a
    method that cannot get under ``target`` is left out. EViT, attention top-k and PPT rank tokens by class-token
    attention, so a model without a class token has none of them. PPT's knob is r at EViT's layers; its variance
    threshold is calibrated on ``calibration`` images (:func:`ppt_threshold`), and without them PPT is left out.
    """
    depth, layers = len(model.blocks), baseline_layers(len(model.blocks))
    keeps = [k / 1000 for k in range(200, 1001, 5)]
    families = {
        "tome": _tome_schedules(depth, num_patch_tokens(model)),
        "evit": [Routing.evit(k, layers) for k in keeps],
        "topk_attention": [Routing.topk_attention(k, layers) for k in keeps],
        "pitome": [Routing.pitome(k, depth) for k in keeps if k >= 0.5],
        "random": [Routing.random(k, layers, seed=0) for k in keeps],
    }
    tokens = num_patch_tokens(model)
    if model.has_class_token and calibration is not None:
        threshold = ppt_threshold(model, calibration, layers[0])
        families["ppt"] = [Routing.ppt(r, layers, threshold, num_tokens=tokens) for r in range(1, tokens // 2 + 1)]
    if not model.has_class_token:
        del families["evit"], families["topk_attention"]
    tuned = {}
    for method, routings in families.items():
        flops = []
        for routing in routings:
            try:
                flops.append((count_flops(model, routing), routing))
            except UserError:  # a ratio that merges more than matching can where few tokens are left
                continue
        if within:
            fitting = [item for item in flops if item[0] <= target]
            if fitting:
                tuned[method] = max(fitting, key=lambda item: item[0])[1]
        elif flops:
            tuned[method] = min(flops, key=lambda item: abs(item[0] - target))[1]
    return tuned


def _tome_schedules(depth: int, tokens: int) -> list[Routing]:
    """ToMe's schedules with per-block r differing by at most one, r capped where matching cannot merge that many
    (as ToMe caps it): the larger r in the first ``m`` blocks, then the same in the last ``m``."""
    first = [[r + 1] * m + [r] * (depth - m) for r in range(0, 24) for m in range(depth)]
    last = [[r] * (depth - m) + [r + 1] * m for r in range(0, 24) for m in range(1, depth)]
    return [Routing.tome(schedule, depth, num_tokens=tokens) for schedule in first + last]


@torch.no_grad()
def ppt_threshold(model: VisionTransformer, images: Tensor, layer: int) -> float:
    """PPT's variance threshold for ``model``: the median, over ``images``, of the unbiased variance of PPT's token
    scores (``cls_value``) at block ``layer`` of the unpruned model, so that half the images are pruned there and half
    merged. PPT's published 7e-5 is DeiT-S's at 196 tokens; the variance of scores that sum to one scales with the
    token count, so another model needs its own.
    """
    x = embed(model, images)
    x = run_blocks(model, x, None, Routing(), {}, 0, layer)[0]
    block = model.blocks[layer]
    x, q, k, v, _ = attend(block, x)
    ctx = ScoreContext(q, k, block.attn.scale, model.num_prefix_tokens, v=v)
    return SCORERS["cls_value"](x, ctx).var(dim=1).median().item()
