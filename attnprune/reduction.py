"""Reducers: remove tokens given their scores (``drop``, ``fuse``) or their similarity (``merge``).

Every reducer is a pure function ``(x, size, n_out, num_prefix, scores=..., metric=...) -> (x, size)`` on
``x: [B, T, C]`` with ``num_prefix`` prefix tokens at the front, which are never removed and stay at the front.
``size`` (``[B, T, 1]`` or None for all ones) counts how many input patches each token stands for; reducers that
average tokens update it, so proportional attention and average pooling stay correct.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["REDUCERS", "drop", "fuse", "merge", "prefix_split", "bipartite_match", "bipartite_merge_plan"]

Reducer = Callable[..., tuple[Tensor, Tensor | None]]


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    return x.gather(dim=1, index=idx[..., None].expand(-1, -1, x.shape[-1]))


def _top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, in token order (keeps the spatial order for the next blocks)."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def drop(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, scores: Tensor, **_: object):
    """Keep the ``n_out`` highest-scoring non-prefix tokens and discard the rest."""
    keep = _top_indices(scores, n_out)
    prefix = x[:, :num_prefix]
    x = torch.cat([prefix, _gather_tokens(x[:, num_prefix:], keep)], dim=1)
    if size is not None:
        size = torch.cat([size[:, :num_prefix], _gather_tokens(size[:, num_prefix:], keep)], dim=1)
    return x, size


def fuse(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, scores: Tensor, **_: object):
    """EViT: keep the ``n_out - 1`` highest-scoring tokens and average the others, weighted by score and size,
    into one fused token appended at the end."""
    n_keep = n_out - 1
    tokens = x[:, num_prefix:]
    if size is None:
        size = torch.ones_like(x[..., :1])
    order = scores.argsort(dim=1, descending=True)
    keep, rest = order[:, :n_keep].sort(dim=1).values, order[:, n_keep:]
    weights = scores.gather(1, rest)[..., None] * _gather_tokens(size[:, num_prefix:], rest)
    fused = (_gather_tokens(tokens, rest) * weights).sum(dim=1, keepdim=True) / weights.sum(
        dim=1, keepdim=True
    ).clamp_min(torch.finfo(x.dtype).tiny)
    x = torch.cat([x[:, :num_prefix], _gather_tokens(tokens, keep), fused], dim=1)
    rest_size = _gather_tokens(size[:, num_prefix:], rest).sum(dim=1, keepdim=True)
    size = torch.cat([size[:, :num_prefix], _gather_tokens(size[:, num_prefix:], keep), rest_size], dim=1)
    return x, size


def prefix_split(num_prefix: int) -> tuple[int, int]:
    """Prefix tokens in ToMe's set A (even positions) and set B (odd positions)."""
    return (num_prefix + 1) // 2, num_prefix // 2


def bipartite_match(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's matching (see :func:`bipartite_merge_plan`), as indices into set A (even positions) and B (odd).

    Returns:
        ``unmerged`` ``[B, N_A - r]`` A indices kept, in index order; ``sources`` ``[B, r]`` A indices merged away;
        ``destinations`` ``[B, r]`` the B index each source is summed into.
    """
    prefix_a, prefix_b = prefix_split(num_prefix)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        # bmm, not @: under torch.compile, matmul's decomposition guards on the parity of the token count, which
        # would compile a block twice more (odd and even counts)
        similarity = torch.bmm(metric[:, ::2], metric[:, 1::2].transpose(1, 2))
        similarity[:, :prefix_a, :] = -torch.inf
        similarity[:, :, :prefix_b] = -torch.inf
        best, partner = similarity.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)
        unmerged = edges[:, r:].sort(dim=1).values
        sources = edges[:, :r]
        destinations = partner.gather(1, sources)
    return unmerged, sources, destinations


def bipartite_merge_plan(metric: Tensor, r: int, num_prefix: int) -> Callable[[Tensor], Tensor]:
    """ToMe's bipartite soft matching: a function summing ``r`` tokens into their most similar partners.

    The sequence (prefix included) alternates between set A (even positions) and set B (odd positions). Every A
    token is matched to its most similar B token (cosine of ``metric``); the ``r`` best-matched A tokens are summed
    into their partners. Prefix tokens are never merged: in A they are never sources, in B never destinations. The
    result keeps the prefix in its order, then the unmerged A tokens in index order, then B: that order decides the
    next block's split.

    Args:
        metric: ``[B, T, d]`` similarity features (ToMe: keys averaged over heads).
        r: tokens to remove.
        num_prefix: prefix tokens at the front.

    Returns:
        ``merge(x) -> x'`` mapping ``[B, T, C]`` to ``[B, T - r, C]`` by summation (divide by merged sizes for
        averages).
    """
    prefix_a, prefix_b = prefix_split(num_prefix)
    unmerged, sources, destinations = bipartite_match(metric, r, num_prefix)

    def merge_sum(x: Tensor) -> Tensor:
        set_a, set_b = x[:, ::2], x[:, 1::2]
        kept_a = _gather_tokens(set_a, unmerged)
        index = destinations[..., None].expand(-1, -1, x.shape[-1])
        set_b = set_b.scatter_reduce(1, index, _gather_tokens(set_a, sources), reduce="sum")
        prefix = [
            kept_a[:, i // 2 : i // 2 + 1] if i % 2 == 0 else set_b[:, i // 2 : i // 2 + 1] for i in range(num_prefix)
        ]
        return torch.cat([*prefix, kept_a[:, prefix_a:], set_b[:, prefix_b:]], dim=1)

    return merge_sum


def merge(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, metric: Tensor, **_: object):
    """ToMe: merge the ``T - num_prefix - n_out`` most redundant tokens by size-weighted averaging."""
    r = x.shape[1] - num_prefix - n_out
    if size is None:
        size = torch.ones_like(x[..., :1])
    merge_sum = bipartite_merge_plan(metric, r, num_prefix)
    x = merge_sum(x * size)
    size = merge_sum(size)
    return x / size, size


REDUCERS: dict[str, Reducer] = {"drop": drop, "fuse": fuse, "merge": merge}
