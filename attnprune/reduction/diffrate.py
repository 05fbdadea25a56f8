"""DiffRate's reduction (Chen et al., ICCV 2023): prune by score, then merge each further token into its most similar
kept token (``absorb``).

In a block, the tokens are ranked by the rule's scorer (DiffRate: class-token attention averaged over heads). The
``n_pruned`` best survive the pruning; of those, the ``n_out`` best are kept and every other one is merged into the
kept token most similar to it (cosine of the block's hidden state after attention; prefix tokens are never merged
into). As DiffRate's code does, the merged token is the plain mean of the kept token and the tokens merged into it,
while its size grows by each merged token's size times its similarity to it: proportional attention then weights a
token by how much of the merged content it really holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnprune.reduction.registry import gather_tokens, register_reducer

__all__ = ["absorb"]


def _absorb_flops(plan: object, tokens: int, dim: int, head_dim: int) -> int:
    """Cosine similarity of the merged tokens with the kept ones, then their averaging."""
    merged = plan.n_pruned - plan.n_keep if plan.n_pruned is not None else plan.n_in - plan.n_keep
    return merged * plan.n_keep * dim + merged * dim


@register_reducer("absorb", takes_score=True, metric="tokens", options=("prune",), averages=True, flops=_absorb_flops)
def absorb(
    x: Tensor,
    size: Tensor | None,
    n_out: int,
    num_prefix: int,
    *,
    scores: Tensor,
    metric: Tensor,
    n_pruned: int,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """Keep the ``n_pruned`` highest-scoring non-prefix tokens, then merge all but the ``n_out`` best of them into
    their most similar kept token (see the module docstring)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    order = scores.argsort(dim=1, descending=True)
    kept, merged = order[:, :n_out].sort(dim=1).values, order[:, n_out:n_pruned]
    patches, patch_size = x[:, num_prefix:], size[:, num_prefix:]
    features = metric[:, num_prefix:] / metric[:, num_prefix:].norm(dim=-1, keepdim=True)
    similarity = gather_tokens(features, merged) @ gather_tokens(features, kept).transpose(1, 2)
    best, partner = similarity.max(dim=-1)  # [B, merged]: each merged token's most similar kept token
    index = partner[..., None]
    width = x.shape[-1]
    sums = gather_tokens(patches, kept).scatter_add(1, index.expand(-1, -1, width), gather_tokens(patches, merged))
    counts = torch.ones_like(kept, dtype=x.dtype).scatter_add(1, partner, torch.ones_like(best, dtype=x.dtype))
    grown = gather_tokens(patch_size, kept).scatter_add(1, index, gather_tokens(patch_size, merged) * best[..., None])
    x = torch.cat([x[:, :num_prefix], sums / counts[..., None]], dim=1)
    return x, torch.cat([size[:, :num_prefix], grown], dim=1)
