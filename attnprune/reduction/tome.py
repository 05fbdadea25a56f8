"""ToMe's bipartite soft matching (Bolya et al., 2023): ``merge`` sums the most similar tokens into their partners,
weighted by size, matching on the attention keys averaged over heads."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from attnprune.reduction.registry import gather_tokens, register_reducer

__all__ = ["bipartite_match", "bipartite_merge_plan", "merge", "prefix_split"]


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
        kept_a = gather_tokens(set_a, unmerged)
        index = destinations[..., None].expand(-1, -1, x.shape[-1])
        set_b = set_b.scatter_reduce(1, index, gather_tokens(set_a, sources), reduce="sum")
        prefix = [
            kept_a[:, i // 2 : i // 2 + 1] if i % 2 == 0 else set_b[:, i // 2 : i // 2 + 1] for i in range(num_prefix)
        ]
        return torch.cat([*prefix, kept_a[:, prefix_a:], set_b[:, prefix_b:]], dim=1)

    return merge_sum


def _merge_flops(plan: object, tokens: int, dim: int, head_dim: int) -> int:
    """Cosine matching of set A against set B on the head-averaged keys, then the weighted averaging."""
    return math.ceil(tokens / 2) * (tokens // 2) * head_dim + 2 * tokens * dim


@register_reducer("merge", metric="keys", max_removed=lambda n: n // 2, averages=True, flops=_merge_flops)
def merge(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, metric: Tensor, **_: object):
    """ToMe: merge the ``T - num_prefix - n_out`` most redundant tokens by size-weighted averaging."""
    r = x.shape[1] - num_prefix - n_out
    if size is None:
        size = torch.ones_like(x[..., :1])
    merge_sum = bipartite_merge_plan(metric, r, num_prefix)
    x = merge_sum(x * size)
    size = merge_sum(size)
    return x / size, size
