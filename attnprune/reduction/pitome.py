"""PiToMe's energy-protected merging (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging",
NeurIPS 2024): ``energy_merge`` and ``energy_bipartite``.

Both rank the patch tokens by an *energy score* computed on the attention keys averaged over heads (prefix tokens
excluded): for token ``i``, the mean over all patch tokens ``j`` (``i`` included) of ``ELU(cos(k_i, k_j) - margin)``
(ELU's alpha 1). A token similar to many others (background) has a high energy and is merged first; an isolated
one (a small object) has a low energy and is protected.

- ``energy_merge`` (the official code's ``pitome``, its later blocks): to remove ``r`` tokens, the ``2 r``
  highest-energy tokens alternate, in energy order, between set A (ranks 0, 2, 4, ...) and set B (ranks 1, 3, ...);
  every A token is merged into its most similar B token (cosine of the keys) and the other tokens are untouched.
  It removes at most half of the tokens.
- ``energy_bipartite`` (the official ``pitome_bsm``, its earlier blocks): all tokens alternate, in energy order,
  between A and B, and ToMe's bipartite soft matching merges the ``r`` best-matched A tokens into their partners.
  It removes at most the size of A, ``ceil(n / 2)``.

Merging is ToMe's size-weighted average (:func:`attnprune.reduction.tome.merge` on the tokens in energy order) and
the sizes add up. The reducers keep the prefix tokens first and never merge them; the order of the other tokens
differs from the official code's, which changes nothing (attention does not depend on the order of its tokens once
the position embedding is added). ToMe's matching computes the A-to-B cosines again where the official code gathers
them from the energy's similarity matrix: the same values, at a quarter more matrix products in
``energy_bipartite`` (counted in its FLOPs).

Where the official code (hchautran/PiToMe, ``algo/pitome``) and the paper differ, these reducers and
:meth:`~attnprune.routing.Routing.pitome` follow the code:

- the paper's energy keeps the cosine itself for neighbours above the margin (``x`` if ``x >= m``, else
  ``alpha (exp(x - m) - 1)``); the code, and this module, use ``ELU(x - m)``, which also subtracts the margin above
  it, so the ranking differs from the paper's formula;
- the code uses the bipartite variant (``energy_bipartite``) in the first ``ceil(depth / 2)`` blocks and protects
  tokens (``energy_merge``) only in the others, with the margin falling from 0.75 in block 0 as
  ``0.75 - 0.75 * layer / depth``;
- the code tracks token sizes and averages by them, but its attention is not proportional to them
  (:meth:`Routing.pitome` sets ``prop_attn=False``);
- the code counts only the class token as a prefix (a distillation token would be ranked and merged); here every
  prefix token is excluded from the energy and kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnprune.reduction.registry import gather_tokens, register_reducer
from attnprune.reduction.tome import merge

__all__ = ["energy_bipartite", "energy_merge", "energy_score"]


def energy_score(metric: Tensor, margin: float) -> Tensor:
    """PiToMe's energy of each token: the mean over all tokens ``j`` of ``ELU(cos(metric_i, metric_j) - margin)``.

    Args:
        metric: ``[B, N, d]`` features of the tokens to rank (PiToMe: the patch tokens' keys averaged over heads).
        margin: the cosine similarity from which a neighbour adds energy linearly (below it, exponentially less).

    Returns:
        ``[B, N]`` energies; higher means more redundant.

    Example:
        >>> keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # two equal tokens and an orthogonal one
        >>> energy_score(keys, 0.5)  # (0.5 + 0.5 + (exp(-0.5) - 1)) / 3 and (2 (exp(-0.5) - 1) + 0.5) / 3
        tensor([[ 0.2022,  0.2022, -0.0956]])
    """
    features = F.normalize(metric, dim=-1)
    similarity = torch.bmm(features, features.transpose(1, 2))
    return F.elu(similarity - margin).mean(dim=-1)


def _by_energy(tensors: tuple[Tensor, ...], metric: Tensor, num_prefix: int, margin: float) -> list[Tensor]:
    """The patch tokens of each of ``tensors`` (``[B, T, *]``, prefix first) in descending order of energy."""
    order = energy_score(metric[:, num_prefix:], margin).argsort(dim=1, descending=True)
    return [gather_tokens(t[:, num_prefix:], order) for t in tensors]


def _energy_flops(n: int, head_dim: int) -> int:
    """Cosine similarity of every pair of the ``n`` patch tokens' head-averaged keys."""
    return n * n * head_dim


def _bipartite_flops(plan: object, tokens: int, dim: int, head_dim: int) -> int:
    """The energy, then ToMe's matching of A against B and the size-weighted averaging (products, divisions)."""
    n, r = plan.n_in, plan.n_in - plan.n_out
    return _energy_flops(n, head_dim) + math.ceil(n / 2) * (n // 2) * head_dim + (2 * n - r) * dim


def _protected_flops(plan: object, tokens: int, dim: int, head_dim: int) -> int:
    """The energy, then the matching of the r A tokens against the r B tokens and their size-weighted averaging."""
    r = plan.n_in - plan.n_out
    return _energy_flops(plan.n_in, head_dim) + r * r * head_dim + 3 * r * dim


_MATCHES_ON_KEYS_BY_MARGIN = {"metric": "keys", "options": ("margin",), "required": ("margin",), "averages": True}


@register_reducer(
    "energy_bipartite",
    max_removed=lambda n: (n + 1) // 2 if n > 1 else 0,
    flops=_bipartite_flops,
    **_MATCHES_ON_KEYS_BY_MARGIN,
)
def energy_bipartite(
    x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, metric: Tensor, margin: float, **_: object
) -> tuple[Tensor, Tensor]:
    """PiToMe's earlier blocks: bipartite soft matching over all patch tokens split alternately in energy order
    (see the module docstring); ``n_in - n_out`` tokens are merged by size-weighted averaging."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    ranked, ranked_size, ranked_metric = _by_energy((x, size, metric), metric, num_prefix, margin)
    merged, merged_size = merge(ranked, ranked_size, n_out, 0, metric=ranked_metric)
    return torch.cat([x[:, :num_prefix], merged], dim=1), torch.cat([size[:, :num_prefix], merged_size], dim=1)


@register_reducer("energy_merge", max_removed=lambda n: n // 2, flops=_protected_flops, **_MATCHES_ON_KEYS_BY_MARGIN)
def energy_merge(
    x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, metric: Tensor, margin: float, **_: object
) -> tuple[Tensor, Tensor]:
    """PiToMe's later blocks: to remove ``r = n_in - n_out`` tokens, each of the ``r`` A tokens among the ``2 r``
    highest-energy ones merges into its most similar B token; the lower-energy tokens are protected (see the module
    docstring)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    r = x.shape[1] - num_prefix - n_out
    ranked, ranked_size, ranked_metric = _by_energy((x, size, metric), metric, num_prefix, margin)
    merged, merged_size = merge(ranked[:, : 2 * r], ranked_size[:, : 2 * r], r, 0, metric=ranked_metric[:, : 2 * r])
    x = torch.cat([x[:, :num_prefix], ranked[:, 2 * r :], merged], dim=1)
    return x, torch.cat([size[:, :num_prefix], ranked_size[:, 2 * r :], merged_size], dim=1)
