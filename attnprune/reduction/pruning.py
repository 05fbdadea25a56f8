"""Reducers that keep the highest-scoring tokens: ``drop`` (attention top-k) and ``fuse`` (EViT, Liang et al., 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnprune.reduction.registry import gather_tokens, register_reducer

__all__ = ["drop", "fuse", "top_indices"]


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, in token order (keeps the spatial order for the next blocks)."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


@register_reducer("drop", takes_score=True)
def drop(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, scores: Tensor, **_: object):
    """Keep the ``n_out`` highest-scoring non-prefix tokens and discard the rest."""
    keep = top_indices(scores, n_out)
    prefix = x[:, :num_prefix]
    x = torch.cat([prefix, gather_tokens(x[:, num_prefix:], keep)], dim=1)
    if size is not None:
        size = torch.cat([size[:, :num_prefix], gather_tokens(size[:, num_prefix:], keep)], dim=1)
    return x, size


@register_reducer(
    "fuse",
    takes_score=True,
    added=1,
    averages=True,
    flops=lambda plan, tokens, dim, head_dim: (plan.n_in - plan.n_keep) * dim,
)
def fuse(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, scores: Tensor, **_: object):
    """EViT: keep the ``n_out - 1`` highest-scoring tokens and average the others, weighted by score and size,
    into one fused token appended at the end."""
    n_keep = n_out - 1
    tokens = x[:, num_prefix:]
    if size is None:
        size = torch.ones_like(x[..., :1])
    order = scores.argsort(dim=1, descending=True)
    keep, rest = order[:, :n_keep].sort(dim=1).values, order[:, n_keep:]
    weights = scores.gather(1, rest)[..., None] * gather_tokens(size[:, num_prefix:], rest)
    fused = (gather_tokens(tokens, rest) * weights).sum(dim=1, keepdim=True) / weights.sum(
        dim=1, keepdim=True
    ).clamp_min(torch.finfo(x.dtype).tiny)
    x = torch.cat([x[:, :num_prefix], gather_tokens(tokens, keep), fused], dim=1)
    rest_size = gather_tokens(size[:, num_prefix:], rest).sum(dim=1, keepdim=True)
    size = torch.cat([size[:, :num_prefix], gather_tokens(size[:, num_prefix:], keep), rest_size], dim=1)
    return x, size
