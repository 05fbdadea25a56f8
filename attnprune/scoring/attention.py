"""Attention scorers: how much attention a token receives."""

import torch
from torch import Tensor

from attnprune.scoring.context import ScoreContext
from attnprune.scoring.registry import register_scorer


@register_scorer("cls_attention", "attention", flops=lambda t, c, h: t * c + h * t, needs_class_token=True)
def cls_attention(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Class-token attention to each patch token, averaged over heads (EViT)."""
    return ctx.cls_attention[:, :, ctx.num_prefix :].mean(dim=1)


@register_scorer("mean_attention", "attention", flops=lambda t, c, h: h * t * t, needs_attention=True)
def mean_attention(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Attention each patch token receives, averaged over all queries and heads."""
    return ctx.attention.mean(dim=(1, 2))[:, ctx.num_prefix :]


@register_scorer("cls_value", "attention", flops=lambda t, c, h: 2 * t * c + h * t + t, needs_class_token=True)
def cls_value(x: Tensor, ctx: ScoreContext) -> Tensor:
    """PPT's token significance (Wu et al., 2023, after ATS): the class token's attention summed over heads times
    the token's value norm (its values concatenated over heads), over the patch tokens, normalised to sum to one.

    Cost: the class row of the attention and the value norms (``T C`` each), the sum over heads and the product."""
    if ctx.v is None:
        raise RuntimeError("cls_value reads the attention values: build the ScoreContext with v")
    value_norm = torch.linalg.vector_norm(ctx.v, dim=(1, 3))
    significance = (ctx.cls_attention.sum(dim=1) * value_norm)[:, ctx.num_prefix :]
    return significance / significance.sum(dim=1, keepdim=True)
