"""PPT's adaptive reduction (Wu et al., 2023, "PPT: Token Pruning and Pooling for Efficient Vision Transformers"):
per image, prune where the token scores are spread out and pool (ToMe's merging) where they are flat
(``adaptive``).

The scores are PPT's token significance (the ``cls_value`` scorer: class-token attention summed over heads times
each token's value norm, normalised to sum to one over the patch tokens). An image whose scores have an unbiased
variance of at least ``threshold`` keeps its ``n_out`` highest-scoring tokens; every other image merges the tokens
it must lose by ToMe's bipartite soft matching on the keys averaged over heads, averaging by size. Either way every
image keeps the same number of tokens, so the batch stays dense; both branches are computed for the whole batch and
each image takes its own, which keeps the shapes static (CUDA graphs, ``torch.compile``).

Where the paper leaves a detail open, this follows the official code (xjwu1024/PPT, ``ppt_deit.py``):

- an image is pruned where the variance is *greater than or equal to* the threshold, so ``threshold=0`` prunes
  every image;
- the pruned tokens are kept in the order of their scores, highest first, not in their spatial order: that order
  decides the set-A/set-B split of a later merge, so it is kept to give the official results;
- the code caps the tokens removed at ``(N - 1) // 2`` of the ``N`` tokens with the class token, on both branches
  (what bipartite matching can merge); a rule asking for more is refused here, never clipped
  (:meth:`~attnprune.routing.Routing.ppt` caps ``r`` when given the model's tokens, as the code does);
- the official code scores DeiT's distillation token as a patch token (it enters the normalisation and the
  variance) and may prune it. Here prefix tokens (class, distillation, registers) are never removed and the scores
  cover the patch tokens only, so on a distilled model the results differ from the official code's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnprune.reduction.registry import REDUCERS, gather_tokens, register_reducer
from attnprune.reduction.tome import merge

__all__ = ["adaptive"]


def _adaptive_flops(plan: object, tokens: int, dim: int, head_dim: int) -> int:
    """Both branches run for every image: ToMe's matching and averaging (pruning's sort and gather are no
    multiply-accumulates), plus the variance of the scores (one square per token)."""
    return REDUCERS["merge"].flops(plan, tokens, dim, head_dim) + plan.n_in


@register_reducer(
    "adaptive",
    takes_score=True,
    metric="keys",
    options=("threshold",),
    required=("threshold",),
    max_removed=lambda n: n // 2,
    averages=True,
    flops=_adaptive_flops,
)
def adaptive(
    x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, scores: Tensor, metric: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """PPT: per image, keep the ``n_out`` highest-scoring non-prefix tokens where the unbiased variance of its
    ``scores`` is >= ``threshold``, else merge down to ``n_out`` by ToMe's bipartite soft matching on ``metric`` (see
    the module docstring).

    Args:
        x: tokens ``[B, T, C]``, ``num_prefix`` prefix tokens first.
        size: their sizes ``[B, T, 1]`` (None: all ones).
        n_out: non-prefix tokens left.
        num_prefix: prefix tokens, never removed.
        scores: ``[B, T - num_prefix]`` token significance (``cls_value``).
        metric: ``[B, T, d]`` keys averaged over heads, ToMe's matching features.
        threshold: the variance from which an image is pruned.

    Returns:
        The tokens ``[B, num_prefix + n_out, C]`` and their sizes.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    pruning = (scores.var(dim=1) >= threshold)[:, None, None]
    kept = scores.argsort(dim=1, descending=True)[:, :n_out] + num_prefix
    prefix = torch.arange(num_prefix, device=x.device).expand(len(x), -1)
    index = torch.cat([prefix, kept], dim=1)
    merged, merged_size = merge(x, size, n_out, num_prefix, metric=metric)
    x = torch.where(pruning, gather_tokens(x, index), merged)
    return x, torch.where(pruning, gather_tokens(size, index), merged_size)
