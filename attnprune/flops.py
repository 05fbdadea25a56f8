"""Analytic FLOPs of a (pruned) timm ViT.

One convention throughout: a multiply-accumulate is one FLOP (fvcore's), under which DeiT-S/16 at 224 px is 4.6
GFLOPs. The count follows the per-layer token counts of the routing and includes the scorers' and reducers' own
work; element-wise work outside them (norms, activations, softmax) is not counted, as in fvcore.
"""

from __future__ import annotations

from torch import nn

from attnprune.errors import UserError
from attnprune.reduction import REDUCERS
from attnprune.routing import LayerPlan, Routing
from attnprune.scoring import SCORERS
from attnprune.vit import check_prunable, find_vit, num_patch_tokens, routing_of

__all__ = ["count_flops", "linear_macs", "reducer_flops"]


def linear_macs(module: nn.Module | None) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def reducer_flops(plan: LayerPlan, tokens: int, dim: int, head_dim: int) -> int:
    """Multiply-accumulates of a reducer on ``tokens`` tokens (prefix included) of width ``dim``."""
    if plan.n_out == plan.n_in:
        return 0
    return REDUCERS[plan.rule.reduce].flops(plan, tokens, dim, head_dim)


def _lookahead_attention_flops(attn: nn.Module, t_in: int, t_out: int) -> int:
    """The attention of a block whose reducer runs before it (MCTF's one-step-ahead attention): queries, keys and
    probabilities on the ``t_in`` tokens received; the probabilities merged (a product per entry of the key-merged
    rows, a division per entry of the merged ones); values, probabilities times values and projection on ``t_out``."""
    queries_keys = 2 * attn.qkv.in_features * attn.qkv.out_features // 3
    merging = attn.num_heads * (t_in + t_out) * t_out
    on_kept = t_out * (linear_macs(attn) - queries_keys) + t_out * t_out * attn.attn_dim
    return t_in * queries_keys + t_in * t_in * attn.attn_dim + merging + on_kept


def count_flops(
    model: nn.Module, routing: Routing | dict | str | None = None, img_size: int | tuple[int, int] | None = None
) -> int:
    """Multiply-accumulates per image of ``model`` under ``routing``, computed on paper.

    Args:
        model: a timm ``VisionTransformer`` (need not be pruned: the routing is applied on paper), converted ones
            included, or a model whose ``visual`` is one (an open_clip CLIP model with its tower converted).
        routing: the routing, anything :meth:`Routing.parse` reads; default the one :func:`attnprune.prune`
            attached, else none.
        img_size: input side (or ``(h, w)``); default the model's own input size.

    Returns:
        FLOPs per image (one multiply-accumulate = one FLOP).

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
        >>> count_flops(model), count_flops(model, "tome:r=8")
        (8958816, 6595424)
    """
    model = find_vit(model)
    routing = routing_of(model, routing)
    check_prunable(model, routing)
    if model.attn_pool is not None:
        raise UserError("count_flops does not model attention-pool heads (global_pool='map')")
    prefix, depth = model.num_prefix_tokens, len(model.blocks)
    patches = num_patch_tokens(model, img_size)
    plans = {plan.rule.layer: plan for plan in routing.resolve(depth, patches)}
    counts = routing.token_counts(depth, patches)

    total = patches * model.patch_embed.proj.weight.numel()
    for i, block in enumerate(model.blocks):
        attn = block.attn
        t_in = counts[i] + prefix
        t_out = counts[i + 1] + prefix
        plan = plans.get(i)
        if plan is not None and plan.n_out != plan.n_in and REDUCERS[plan.rule.reduce].lookahead:
            total += _lookahead_attention_flops(attn, t_in, t_out)
        else:
            total += t_in * linear_macs(attn) + 2 * t_in * t_in * attn.attn_dim
        if plan is not None and plan.n_out != plan.n_in:
            if plan.rule.score is not None:
                total += SCORERS[plan.rule.score].flops(t_in, model.embed_dim, attn.num_heads)
            total += reducer_flops(plan, t_in, model.embed_dim, attn.head_dim)
        total += t_out * linear_macs(block.mlp)
    total += linear_macs(model.head) + linear_macs(getattr(model, "head_dist", None))
    return int(total)
