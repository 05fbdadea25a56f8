"""Attention selectivity as ``torchmetrics.Metric`` s: each averages one function of
:mod:`attnprune.selectivity.functional` over every row it sees.

The states are a running sum and a row count with ``dist_reduce_fx="sum"``, so the mean is exact across batches of
any size and across DDP ranks (``compute()`` syncs), and two instances merge with ``merge_state``. With
``num_heads=H`` the inputs are ``[..., H, N]`` and every state, and ``compute()``, is ``[H]``: one mean per head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from attnprune.errors import UserError
from attnprune.selectivity.functional import (
    _topk_count,
    effective_share,
    gini,
    head_agreement,
    max_weight,
    normalized_entropy,
    rank_stability,
    topk_mass,
    topk_overlap,
)

__all__ = [
    "MeanOverRows",
    "NormalizedEntropy",
    "Gini",
    "TopKMass",
    "EffectiveShare",
    "MaxWeight",
    "HeadAgreement",
    "RankStability",
    "TopKOverlap",
]


class MeanOverRows(Metric):
    """Mean of a per-row value over all rows seen; subclasses turn their inputs into the values in ``update``.

    ``higher_is_better`` reads "more selective" for concentration metrics and "more reliable" for stability ones.

    Args:
        num_heads: when given, inputs are ``[..., H, N]`` with ``H == num_heads`` and the metric keeps one mean per
            head, ``compute()`` returning ``[H]``; when ``None``, one mean over all rows, ``compute()`` returning a
            scalar.
        **kwargs: passed to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool | None = None
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = 1.0

    total: Tensor
    count: Tensor

    def __init__(self, num_heads: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
            raise UserError(f"num_heads must be a positive int or None, got {num_heads!r}")
        self.num_heads = num_heads
        shape = () if num_heads is None else (num_heads,)
        self.add_state("total", torch.zeros(shape), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def _check_heads(self, x: Tensor, name: str) -> None:
        if self.num_heads is not None and (x.ndim < 2 or x.shape[-2] != self.num_heads):
            raise UserError(f"{name} must be [..., H, N] with H = num_heads = {self.num_heads}, got {tuple(x.shape)}")

    def _accumulate(self, values: Tensor) -> None:
        """Add per-row values, ``[...]`` (or ``[..., H]`` per head), to the running sum and count."""
        values = values.detach().to(self.total.dtype)
        if self.num_heads is None:
            self.total += values.sum()
            self.count += values.numel()
        else:
            values = values.reshape(-1, self.num_heads)
            self.total += values.sum(dim=0)
            self.count += values.shape[0]

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another instance's (or a state dict's) sum and count to this one's.

        torchmetrics 1.9 keeps the value cached by an earlier ``compute()`` after a merge; this drops it.
        """
        super().merge_state(incoming_state)
        self._computed = None

    def compute(self) -> Tensor:
        """Mean of the accumulated values, a scalar or ``[H]``; NaN where nothing was accumulated."""
        return self.total / self.count


class _ConcentrationMetric(MeanOverRows):
    """Mean over attention rows of a concentration function ``attn[..., N] -> [...]``."""

    def _values(self, attn: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, attn: Tensor) -> None:
        """Accumulate attention rows.

        Args:
            attn: attention rows ``[..., N]`` (``[..., H, N]`` with ``num_heads``), non-negative, summing to 1.
        """
        self._check_heads(attn, "attn")
        self._accumulate(self._values(attn))


class NormalizedEntropy(_ConcentrationMetric):
    """Mean normalized entropy ``H / log N`` of attention rows (see :func:`functional.normalized_entropy`)."""

    higher_is_better = False

    def _values(self, attn: Tensor) -> Tensor:
        return normalized_entropy(attn)


class Gini(_ConcentrationMetric):
    """Mean Gini coefficient of attention rows (see :func:`functional.gini`)."""

    higher_is_better = True

    def _values(self, attn: Tensor) -> Tensor:
        return gini(attn)


class TopKMass(_ConcentrationMetric):
    """Mean share of attention mass on each row's ``ceil(fraction * N)`` largest weights (see
    :func:`functional.topk_mass`).

    Args:
        fraction: share of the tokens counted, in (0, 1].
        num_heads: see :class:`MeanOverRows`.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better = True

    def __init__(self, fraction: float = 0.1, num_heads: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_heads=num_heads, **kwargs)
        _topk_count(fraction, 1)  # validates the range
        self.fraction = fraction

    def _values(self, attn: Tensor) -> Tensor:
        return topk_mass(attn, self.fraction)


class EffectiveShare(_ConcentrationMetric):
    """Mean effective token share ``exp(H) / N`` of attention rows (see :func:`functional.effective_share`)."""

    higher_is_better = False

    def _values(self, attn: Tensor) -> Tensor:
        return effective_share(attn)


class MaxWeight(_ConcentrationMetric):
    """Mean largest weight of attention rows (see :func:`functional.max_weight`)."""

    higher_is_better = True

    def _values(self, attn: Tensor) -> Tensor:
        return max_weight(attn)


class HeadAgreement(MeanOverRows):
    """Mean pairwise Spearman correlation between heads' token rankings (see :func:`functional.head_agreement`).

    With ``num_heads`` it keeps, per head, the mean correlation of that head with the other heads.
    """

    higher_is_better = True
    plot_lower_bound = -1.0

    def update(self, attn_heads: Tensor) -> None:
        """Accumulate one agreement value per image (per image and head with ``num_heads``).

        Args:
            attn_heads: one score per token and head ``[..., H, N]``, ``H >= 2``.
        """
        self._check_heads(attn_heads, "attn_heads")
        self._accumulate(head_agreement(attn_heads, per_head=self.num_heads is not None))


class RankStability(MeanOverRows):
    """Mean Spearman correlation between two rankings of the same tokens (see :func:`functional.rank_stability`):
    an image against a perturbed copy, or one layer against the next."""

    higher_is_better = True
    plot_lower_bound = -1.0

    def update(self, scores_a: Tensor, scores_b: Tensor) -> None:
        """Accumulate one correlation per row.

        Args:
            scores_a: token scores ``[..., N]`` (``[..., H, N]`` with ``num_heads``).
            scores_b: the other scores of the same tokens, the same shape as ``scores_a``.
        """
        self._check_heads(scores_a, "scores_a")
        self._accumulate(rank_stability(scores_a, scores_b))


class TopKOverlap(MeanOverRows):
    """Mean share of the top ``fraction`` of tokens two scorings have in common (see
    :func:`functional.topk_overlap`): what a prune keeping that fraction keeps of an oracle's choice."""

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, fraction: float = 0.5, num_heads: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_heads=num_heads, **kwargs)
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def update(self, scores_a: Tensor, scores_b: Tensor) -> None:
        """Accumulate one overlap per row of ``[..., N]`` scores."""
        self._check_heads(scores_a, "scores_a")
        self._accumulate(topk_overlap(scores_a, scores_b, _topk_count(self.fraction, scores_a.shape[-1])))
