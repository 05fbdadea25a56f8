"""Attention selectivity as stateless functions: how concentrated and how stable attention rows are.

Concentration metrics take attention rows ``attn[..., N]`` (non-negative, summing to 1 over the last dim) and return
one value per row, ``[...]``; rows that are not attention weights (a NaN, a negative weight, a row not summing to 1)
raise a ``UserError`` (:func:`check_attention`) rather than give NaN or values outside the metric's range. Ranking
and stability metrics compare two scorings of the same ``N`` tokens with Spearman's rank correlation (NaN scores
raise too). Everything here is plain torch; :mod:`attnprune.selectivity.metrics` wraps each function in a
``torchmetrics.Metric`` that averages it over batches and DDP ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnprune.errors import UserError

__all__ = [
    "check_attention",
    "normalized_entropy",
    "gini",
    "topk_mass",
    "effective_share",
    "max_weight",
    "average_rank",
    "spearman",
    "topk_overlap",
    "head_agreement",
    "rank_stability",
]


def check_attention(attn: Tensor, name: str, normalized: bool = True) -> None:
    """Refuse rows that are not attention weights: a NaN or infinity, a negative weight, or (``normalized``) a row
    that does not sum to 1 over the last dim (within 1e-4, 1e-2 in 16-bit floats); the metrics would return NaN or
    values outside their range.

    Raises:
        UserError: naming the metric (``name``) and the first offending value.
    """
    if not attn.is_floating_point():
        raise UserError(f"{name}: attention rows must be floating point, got {attn.dtype}")
    if attn.numel() == 0:
        return
    _check_finite(attn, name, "attention rows")
    low = attn.min()
    if low < 0:
        raise UserError(f"{name}: attention weights must be non-negative, got {low.item():.4g}")
    if normalized:
        sums = attn.sum(dim=-1, dtype=torch.float64).flatten()
        worst = (sums - 1).abs().argmax()
        if (sums[worst] - 1).abs() > (1e-2 if attn.element_size() <= 2 else 1e-4):
            raise UserError(
                f"{name}: attention rows must sum to 1 over the last dim, got a row summing to {sums[worst]:.6g}"
            )


def _check_finite(x: Tensor, name: str, what: str = "scores") -> None:
    """Refuse ``x`` holding NaN or infinity (a ranking of them is meaningless)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise UserError(f"{name}: {what} must be finite, got {int((~torch.isfinite(x)).sum())} NaN or inf values")


def _entropy(attn: Tensor) -> Tensor:
    """Natural-log entropy of each row, with ``0 * log 0 = 0``."""
    return -torch.special.xlogy(attn, attn).sum(dim=-1)


def normalized_entropy(attn: Tensor) -> Tensor:
    """Entropy of each attention row divided by its maximum, ``H / log N``.

    Args:
        attn: attention rows ``[..., N]``, non-negative and summing to 1 over the last dim.

    Returns:
        ``[...]`` in [0, 1]: 1 for uniform attention, 0 for one-hot; 0 when ``N == 1``.
    """
    check_attention(attn, "normalized_entropy")
    n = attn.shape[-1]
    if n == 1:
        return attn.new_zeros(attn.shape[:-1])
    return _entropy(attn) / math.log(n)


def gini(attn: Tensor) -> Tensor:
    """Gini coefficient of each attention row.

    With the row sorted ascending, ``x_(1) <= ... <= x_(N)``, ``G = sum_i (2i - N - 1) x_(i) / (N sum_i x_i)``.

    Args:
        attn: attention rows ``[..., N]``, non-negative.

    Returns:
        ``[...]``: 0 for uniform attention, ``(N - 1) / N`` for one-hot; 0 for an all-zero row.
    """
    check_attention(attn, "gini", normalized=False)
    n = attn.shape[-1]
    ascending = attn.sort(dim=-1).values
    weights = 2 * torch.arange(1, n + 1, device=attn.device, dtype=attn.dtype) - n - 1
    total = attn.sum(dim=-1)
    return (ascending * weights).sum(dim=-1) / (n * total).clamp_min(torch.finfo(attn.dtype).tiny)


def _topk_count(fraction: float, n: int) -> int:
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    # round first so float noise (0.1 * 30 = 3.0000000000000004) does not add a token
    return min(n, max(1, math.ceil(round(fraction * n, 6))))


def topk_mass(attn: Tensor, fraction: float = 0.1) -> Tensor:
    """Share of each row's attention mass on its ``ceil(fraction * N)`` largest weights.

    Args:
        attn: attention rows ``[..., N]``, non-negative and summing to 1 over the last dim.
        fraction: share of the tokens counted, in (0, 1]; at least one token is counted.

    Returns:
        ``[...]``: ``k / N`` for uniform attention, 1 for one-hot (``k = ceil(fraction * N)``).
    """
    check_attention(attn, "topk_mass")
    k = _topk_count(fraction, attn.shape[-1])
    return attn.topk(k, dim=-1).values.sum(dim=-1)


def effective_share(attn: Tensor) -> Tensor:
    """Effective number of attended tokens as a share of all tokens, ``exp(H) / N``.

    ``exp(H)`` is the perplexity of the row: the number of tokens a uniform row with the same entropy would attend.

    Args:
        attn: attention rows ``[..., N]``, non-negative and summing to 1 over the last dim.

    Returns:
        ``[...]`` in [1/N, 1]: 1 for uniform attention, ``1 / N`` for one-hot.
    """
    check_attention(attn, "effective_share")
    return _entropy(attn).exp() / attn.shape[-1]


def max_weight(attn: Tensor) -> Tensor:
    """Largest weight of each attention row.

    Args:
        attn: attention rows ``[..., N]``.

    Returns:
        ``[...]``: ``1 / N`` for uniform attention, 1 for one-hot.
    """
    check_attention(attn, "max_weight")
    return attn.amax(dim=-1)


def average_rank(x: Tensor) -> Tensor:
    """Ranks along the last dim, 0-based, ties sharing the average of their ranks (``[1, 3, 3]`` -> ``[0, 1.5, 1.5]``).

    Args:
        x: scores ``[..., N]``.

    Returns:
        ``[..., N]`` floating-point ranks (at least float32, so they are exact for any realistic ``N``).
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    ascending = x.sort(dim=-1).values
    first = torch.searchsorted(ascending, x, side="left")  # tokens strictly below
    past = torch.searchsorted(ascending, x, side="right")  # tokens below or tied
    return (first + past - 1).to(x.dtype) / 2


def _standardized_ranks(x: Tensor) -> Tensor:
    """Ranks centred and scaled to unit norm, so a dot product of two of them is their Spearman correlation.

    A constant row (all tokens tied) has no spread and maps to zeros.
    """
    r = average_rank(x)
    r = r - r.mean(dim=-1, keepdim=True)
    return r / r.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(r.dtype).eps)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation between two scorings of the same tokens, over the last dim.

    Ties take the average of their ranks (as ``scipy.stats.spearmanr`` does), and the correlation is the Pearson
    correlation of the ranks.

    Args:
        a: scores ``[..., N]``.
        b: scores ``[..., N]``, broadcastable with ``a``.

    Returns:
        ``[...]`` in [-1, 1]: 1 for the same order, -1 for the reverse; 0 when either row is constant (the
        correlation is undefined there, and 0 keeps means over many rows finite).
    """
    _check_finite(a, "spearman")
    _check_finite(b, "spearman")
    return (_standardized_ranks(a) * _standardized_ranks(b)).sum(dim=-1)


def topk_overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Share of the ``k`` highest-scored tokens that two scorings have in common, ``|topk(a) & topk(b)| / k``.

    Ties at the ``k``-th place are broken by ``torch.topk``, which is arbitrary.

    Args:
        a: scores ``[..., N]``.
        b: scores ``[..., N]``, the same shape as ``a``.
        k: number of top tokens compared, ``1 <= k <= N``.

    Returns:
        ``[...]`` in [0, 1].
    """
    n = a.shape[-1]
    if not 1 <= k <= n:
        raise UserError(f"k must be in [1, {n}], got {k}")
    _check_finite(a, "topk_overlap")
    _check_finite(b, "topk_overlap")
    in_a = torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, a.topk(k, dim=-1).indices, True)
    in_b = torch.zeros(b.shape, dtype=torch.bool, device=b.device).scatter_(-1, b.topk(k, dim=-1).indices, True)
    dtype = a.dtype if a.is_floating_point() else torch.get_default_dtype()
    return (in_a & in_b).sum(dim=-1).to(dtype) / k


def head_agreement(attn_heads: Tensor, per_head: bool = False) -> Tensor:
    """Mean pairwise Spearman correlation between the heads' rankings of the tokens.

    Args:
        attn_heads: one score per token and head ``[..., H, N]`` (``[B, H, N]``: e.g. each head's class-token
            attention to the ``N`` patch tokens), ``H >= 2``.
        per_head: return each head's mean correlation with the other heads instead of the mean over all pairs.

    Returns:
        ``[...]`` (``[B]``), or ``[..., H]`` with ``per_head``; 1 when all heads rank the tokens alike. The mean of the
        per-head values over heads equals the pairwise mean.
    """
    h = attn_heads.shape[-2]
    if h < 2:
        raise UserError(f"head agreement needs at least 2 heads, got {h}")
    _check_finite(attn_heads, "head_agreement")
    z = _standardized_ranks(attn_heads)
    corr = z @ z.transpose(-1, -2)  # [..., H, H], Spearman between every pair of heads
    off_diagonal = corr.sum(dim=-1) - corr.diagonal(dim1=-2, dim2=-1)
    if per_head:
        return off_diagonal / (h - 1)
    return off_diagonal.sum(dim=-1) / (h * (h - 1))


def rank_stability(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """Spearman correlation between two rankings of the same tokens.

    Used for an image against a slightly perturbed copy, and for one layer's scores against the next layer's.

    Args:
        scores_a: token scores ``[B, N]`` (or ``[..., N]``, e.g. ``[B, H, N]`` per head).
        scores_b: token scores of the same tokens, the same shape as ``scores_a``.

    Returns:
        ``[B]`` (``[...]``): 1 when the ranking is unchanged, -1 when it is reversed.
    """
    if scores_a.shape != scores_b.shape:
        raise UserError(f"scores_a and scores_b must have the same shape, got {scores_a.shape} and {scores_b.shape}")
    return spearman(scores_a, scores_b)
