"""DiffRate's reduction (Chen et al., ICCV 2023; code OpenGVLab/DiffRate): prune by score, then merge each further
token into its most similar kept token (``absorb``).

In a block, the tokens are ranked by the rule's scorer (DiffRate: class-token attention averaged over heads, with
proportional attention). The ``n_pruned`` best survive the pruning; of those, the ``n_out`` best are kept and every
other one is merged into the kept token most similar to it.

The paper describes the step as pruning the least important tokens, then merging the next least important "with
similar ones among the remaining tokens" (its Fig. 3). Where its text and the official code could be read
differently, this follows the code (``DiffRate/merge.py`` and the eval branch of ``DiffRateBlock``), checked against it
(``tests/test_diffrate.py``: logits within 1e-6 of their scale on tiny DeiT- and MAE-style ViTs):

- the destinations are the ``n_out`` most important tokens only, never a prefix token (the code sets the class
  token's similarity to -inf), and each merged token goes to its single most similar destination;
- similarity is the cosine of the block's hidden state after the attention residual, not of the keys as in ToMe;
- the merged token is the plain mean of the destination and the tokens merged into it, whatever their sizes (the
  code's ``scatter_reduce(..., reduce="mean")``), not ToMe's size-weighted mean;
- its size grows by each merged token's size times its similarity to it, not by its size (the code's comment: a
  change to ToMe's proportional attention that helps off-the-shelf models), so proportional attention and MAE's
  size-weighted average pool count a token by how much of the merged content it holds. As in the code's eval
  branch the size is not clamped (its training branch clamps it to >= 1): a merged token whose best similarity is
  negative shrinks its destination's size, and a size <= 0 gives non-finite attention there as in the code.

The official block sorts all tokens by score and keeps them in that order; here the kept tokens stay in their
original order, which changes no output (attention and pooling do not depend on the order of the tokens). How the
paper's per-block compression rates become kept counts, as the code reads them, is
:meth:`~attnprune.routing.Routing.diffrate`'s.
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
    their most similar kept token (see the module docstring).

    Args:
        x: tokens ``[B, T, C]``, ``num_prefix`` prefix tokens first (kept as they are, never merged into).
        size: their sizes ``[B, T, 1]`` (None: all ones).
        n_out: non-prefix tokens kept (the merge destinations).
        num_prefix: prefix tokens.
        scores: ``[B, T - num_prefix]`` importance of the non-prefix tokens, higher = kept first.
        metric: ``[B, T, C']`` what similarity is the cosine of (the block's hidden state).
        n_pruned: non-prefix tokens left after pruning, ``n_out <= n_pruned <= T - num_prefix``.

    Returns:
        The ``num_prefix + n_out`` tokens (kept ones in their original order, each the plain mean of itself and the
        tokens merged into it) and their sizes.
    """
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
