"""Control scorer: a seeded random ranking, the floor any informed scorer must beat."""

import torch
from torch import Tensor

from attnprune.scoring.context import ScoreContext
from attnprune.scoring.registry import register_scorer


@register_scorer("random", "control", flops=lambda t, c, h: 0)
def random(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Uniform random scores from the routing seed and the layer: the same for every image and every run."""
    n = x.shape[1] - ctx.num_prefix
    scores = torch.rand(n, generator=ctx.generator()).to(device=x.device, dtype=x.dtype)
    return scores.expand(x.shape[0], n)
