"""MCTF's multi-criteria token fusion (Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for
Efficient Vision Transformers", CVPR 2024; code mlvlab/MCTF): ``mctf``.

MCTF merges tokens *before* a block's attention, with that block's attention: it is the one reducer that runs on a
block's input (``lookahead``). The block computes its attention probabilities on the tokens it receives; ``mctf``
matches and merges the tokens with them and returns the probabilities merged the same way (the *one-step-ahead
attention*), which the block then applies to the values of the merged tokens. Everything it needs is computed in the
same forward pass from the block's own weights.

Matching. The sequence (prefix included) alternates between set A (even positions) and set B (odd positions). A pair
(a, b) scores the product of three criteria, each in [0, 1] (:func:`mctf_scores`):

- similarity ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` of the tokens themselves (the block's input);
- informativeness ``(i_a i_b) ** (1 / tau_info)``, where ``i`` is the inverse of the attention a token receives
  (averaged over heads and queries), divided by its largest value in the image: tokens few attend to merge first;
- size ``(s_a s_b) ** (1 / tau_size)``, where ``s`` is the inverse token size divided by its largest value: small
  tokens merge first.

Two-way matching removes ``r`` tokens: the ``r // 2`` A tokens with the best-scoring partner merge into it (ToMe's
step); then the ``r - r // 2`` B tokens whose best-scoring remaining A token scores highest merge into it (the same
scores, read from B's side; a B token that just received A tokens carries them along).

Pooling. Tokens merge by an average weighted by the attention each receives (averaged over heads and queries) times
its size; sizes add up. The attention probabilities merge as the tokens do: a merged key receives the sum of its
members' probabilities, a merged query's row is its members' rows averaged with the same weights, so every row still
sums to one.

The off-the-shelf DeiT-S settings of the official code's README and ``run/eval_deit_s_mctf.sh``
(``--mctf_type [16,0,0,1,1,1,20,40,1,1,0]``: proportional attention, one-step-ahead attention, ``tau_sim=1``,
``tau_info=20``, ``tau_size=40``, two-way matching, attention-weighted pooling) are this module's constants
(:data:`TAU_SIM`, :data:`TAU_INFO`, :data:`TAU_SIZE`); the code's other modes (no one-step-ahead attention, one-way
matching, max or plain-mean pooling, and the training-time teacher branch) are not built.

Where the official code and the paper could be read differently, this follows the code: the informativeness is the
attention a token *receives*, averaged over every query and head (the class token's queries among them); the merged
tokens' order is the code's (prefix, the kept A tokens in their order, then the kept B tokens in descending order of
their best score), which decides the next block's A/B split. It differs from the code in one respect: every prefix
token (class, distillation, registers) is excluded from the matching and kept first, where the code protects only the
class token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnprune.reduction.registry import register_reducer
from attnprune.reduction.tome import prefix_split

__all__ = ["TAU_INFO", "TAU_SIM", "TAU_SIZE", "mctf", "mctf_scores", "two_way_merge"]

TAU_SIM, TAU_INFO, TAU_SIZE = 1.0, 20.0, 40.0
"""MCTF's temperatures of its similarity, informativeness and size criteria (off the shelf, DeiT-S)."""


def _inverse_normalised(values: Tensor) -> Tensor:
    """``1 / values`` divided by its largest value per image (``[B, T]``)."""
    inverse = 1 / values
    return inverse / inverse.amax(dim=1, keepdim=True)


def _pairs(values: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """The non-prefix tokens of set A (even positions) and set B (odd positions) of ``values`` ``[B, T, ...]``."""
    prefix_a, prefix_b = prefix_split(num_prefix)
    return values[:, ::2][:, prefix_a:], values[:, 1::2][:, prefix_b:]


def mctf_scores(metric: Tensor, attention: Tensor, size: Tensor | None, num_prefix: int) -> Tensor:
    """MCTF's pair scores: similarity times informativeness times size criteria (see the module docstring).

    Args:
        metric: ``[B, T, C]`` the tokens (MCTF: the block's input), prefix first.
        attention: ``[B, H, T, T]`` the block's attention probabilities on them.
        size: ``[B, T, 1]`` token sizes (None: all ones).
        num_prefix: prefix tokens at the front, never scored.

    Returns:
        ``[B, N_A, N_B]`` scores in [0, 1] of every non-prefix A token (even position) against every non-prefix B
        token (odd position).

    Example:
        >>> x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])  # class token first
        >>> uniform = torch.full((1, 1, 5, 5), 0.2)  # every token receives the same attention: informativeness 1
        >>> mctf_scores(x, uniform, None, 1)  # A = tokens 2, 4; B = tokens 1, 3: (cos + 1) / 2
        tensor([[[0.5000, 0.8536],
                 [0.0000, 0.1464]]])
    """
    unit = metric / metric.norm(dim=-1, keepdim=True)
    unit_a, unit_b = _pairs(unit, num_prefix)
    scores = ((torch.bmm(unit_a, unit_b.transpose(1, 2)) + 1) / 2) ** (1 / TAU_SIM)
    info_a, info_b = _pairs(_inverse_normalised(attention.mean(dim=(1, 2))), num_prefix)
    scores = scores * (info_a[:, :, None] * info_b[:, None, :]) ** (1 / TAU_INFO)
    if size is not None:
        size_a, size_b = _pairs(_inverse_normalised(size[..., 0]), num_prefix)
        scores = scores * (size_a[:, :, None] * size_b[:, None, :]) ** (1 / TAU_SIZE)
    return scores


def _index(index: Tensor, like: Tensor) -> Tensor:
    """``index`` ``[B, K]`` shaped to gather or scatter along dimension -2 of ``like`` ``[B, ..., T, C]``."""
    shape = (len(index),) + (1,) * (like.dim() - 3) + (index.shape[1], 1)
    return index.view(shape).expand(*like.shape[:-2], index.shape[1], like.shape[-1])


def _take(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-2, _index(index, values))


def _add(values: Tensor, index: Tensor, added: Tensor) -> Tensor:
    return values.scatter_reduce(-2, _index(index, added), added, reduce="sum")


def two_way_merge(scores: Tensor, r: int, num_prefix: int):
    """MCTF's two-way matching on ``scores`` ``[B, N_A, N_B]`` (:func:`mctf_scores`): a function summing ``r`` tokens
    into their partners along dimension -2 of any ``[B, ..., T, C]`` tensor (see the module docstring)."""
    r_a, r_b = r // 2, r - r // 2
    with torch.no_grad():
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        sources_a, kept_a = order[:, :r_a], order[:, r_a:].sort(dim=1).values
        destinations_a = partner.gather(1, sources_a)
        back = scores.gather(1, kept_a[..., None].expand(-1, -1, scores.shape[2])).transpose(1, 2)
        best_b, partner_b = back.max(dim=-1)
        order_b = best_b.argsort(dim=-1, descending=True)
        sources_b, kept_b = order_b[:, :r_b], order_b[:, r_b:]
        destinations_b = partner_b.gather(1, sources_b)
    prefix_a, prefix_b = prefix_split(num_prefix)

    def merge_sum(values: Tensor) -> Tensor:
        set_a, set_b = values[..., ::2, :], values[..., 1::2, :]
        a, b = set_a[..., prefix_a:, :], set_b[..., prefix_b:, :]
        b = _add(b, destinations_a, _take(a, sources_a))
        a = _take(a, kept_a)
        a = _add(a, destinations_b, _take(b, sources_b))
        prefix = [(set_a if i % 2 == 0 else set_b)[..., i // 2 : i // 2 + 1, :] for i in range(num_prefix)]
        return torch.cat([*prefix, a, _take(b, kept_b)], dim=-2)

    return merge_sum


def _mctf_flops(plan: object, tokens: int, dim: int, head_dim: int) -> int:
    """The cosines of the non-prefix A tokens against the non-prefix B tokens, then the weighted average of the
    tokens (a product per input channel, a division per output channel). The probabilities' merging is part of the
    block's attention (:func:`attnprune.flops.count_flops`); the criteria's element-wise products and powers on the
    score matrix are not counted (as PiToMe's ELU is not)."""
    prefix = tokens - plan.n_in
    prefix_a, prefix_b = prefix_split(prefix)
    pairs = ((tokens + 1) // 2 - prefix_a) * (tokens // 2 - prefix_b)
    return pairs * dim + (tokens + plan.n_out + prefix) * dim


@register_reducer(
    "mctf", metric="tokens", lookahead=True, max_removed=lambda n: n // 2, averages=True, flops=_mctf_flops
)
def mctf(
    x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, metric: Tensor, attention: Tensor, **_: object
) -> tuple[Tensor, Tensor, Tensor]:
    """MCTF: merge ``T - num_prefix - n_out`` tokens by two-way matching on three criteria, averaging them by
    attention times size (see the module docstring).

    Args:
        x: ``[B, T, C]`` the block's input tokens, prefix first.
        size: ``[B, T, 1]`` their sizes (None: all ones).
        n_out: non-prefix tokens left.
        num_prefix: prefix tokens at the front, never merged.
        metric: ``[B, T, d]`` the tokens matched by similarity (the block's input; ``x`` may carry extra channels).
        attention: ``[B, H, T, T]`` the block's attention probabilities on ``x``.

    Returns:
        The merged tokens, their sizes and the merged probabilities ``[B, H, T', T']``.
    """
    merge_sum = two_way_merge(
        mctf_scores(metric, attention, size, num_prefix), x.shape[1] - num_prefix - n_out, num_prefix
    )
    if size is None:
        size = torch.ones_like(x[..., :1])
    weight = attention.mean(dim=(1, 2))[..., None] * (size / size.amax(dim=-2, keepdim=True))
    norm = merge_sum(weight)
    keys_merged = merge_sum(attention[..., None])[..., 0]
    attention = merge_sum(keys_merged * weight[:, None]) / norm[:, None]
    return merge_sum(x * weight) / norm, merge_sum(size), attention
