"""Attention scorers: how much attention a token receives."""

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
