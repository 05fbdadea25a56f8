"""Similarity scorers: how a token relates to the class token or to the other tokens."""

import torch
import torch.nn.functional as F
from torch import Tensor

from attnprune.scoring.context import ScoreContext
from attnprune.scoring.registry import register_scorer


@register_scorer("cls_similarity", "similarity", flops=lambda t, c, h: 2 * t * c, needs_class_token=True)
def cls_similarity(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Cosine similarity to the class token, mapped to [0, 1]."""
    cos = F.cosine_similarity(x[:, ctx.num_prefix :], x[:, :1], dim=-1)
    return (1.0 + cos) / 2.0


@register_scorer("distinctiveness", "similarity", flops=lambda t, c, h: 3 * t * c)
def distinctiveness(x: Tensor, ctx: ScoreContext) -> Tensor:
    """1 - cosine similarity to the mean patch token: tokens unlike the average scene score high."""
    tokens = x[:, ctx.num_prefix :]
    return 1.0 - F.cosine_similarity(tokens, tokens.mean(dim=1, keepdim=True), dim=-1)


@register_scorer("redundancy", "similarity", flops=lambda t, c, h: t * t * c + t * c)
def redundancy(x: Tensor, ctx: ScoreContext) -> Tensor:
    """1 - the largest cosine similarity to any other patch token (ToMe's view of duplicates)."""
    tokens = F.normalize(x[:, ctx.num_prefix :], dim=-1)
    sim = tokens @ tokens.transpose(-2, -1)
    itself = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    return 1.0 - sim.masked_fill(itself, -1.0).amax(dim=-1)
