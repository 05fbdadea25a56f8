"""Embedding-statistics scorers: properties of each token's own embedding, no attention needed."""

from torch import Tensor

from attnprune.scoring.context import ScoreContext
from attnprune.scoring.registry import register_scorer


@register_scorer("l2_norm", "statistics", flops=lambda t, c, h: t * c)
def l2_norm(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Euclidean norm of each token."""
    return x[:, ctx.num_prefix :].norm(dim=-1)


@register_scorer("l1_norm", "statistics", flops=lambda t, c, h: t * c)
def l1_norm(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Sum of absolute values of each token."""
    return x[:, ctx.num_prefix :].abs().sum(dim=-1)


@register_scorer("std", "statistics", flops=lambda t, c, h: 2 * t * c)
def std(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Standard deviation of each token over its channels."""
    return x[:, ctx.num_prefix :].std(dim=-1, unbiased=False)


@register_scorer("max_abs", "statistics", flops=lambda t, c, h: t * c)
def max_abs(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Largest absolute channel value of each token (outlier features)."""
    return x[:, ctx.num_prefix :].abs().amax(dim=-1)


@register_scorer("kurtosis", "statistics", flops=lambda t, c, h: 4 * t * c)
def kurtosis(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Kurtosis of each token over its channels, E[(x - mu)^4] / var^2 (>= 1; heavy-tailed tokens score high)."""
    centred = x[:, ctx.num_prefix :] - x[:, ctx.num_prefix :].mean(dim=-1, keepdim=True)
    var = centred.pow(2).mean(dim=-1)
    return centred.pow(4).mean(dim=-1) / var.pow(2).clamp_min(1e-12)
