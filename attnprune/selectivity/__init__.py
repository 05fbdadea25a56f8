"""Attention selectivity: how concentrated, how stable and how reliable attention is, per layer.

- :mod:`~attnprune.selectivity.functional` and :mod:`~attnprune.selectivity.metrics`: every metric as a stateless
  function and as a ``torchmetrics.Metric`` that averages it over batches and DDP ranks;
- :mod:`~attnprune.selectivity.analysis`: :class:`SelectivityAnalyzer`, every metric at every block of a model, and
  the leave-one-out oracle;
- :mod:`~attnprune.selectivity.transition`: the transition depth, where attention takes over;
- :mod:`~attnprune.selectivity.claims`: the three claims attnprune rests on, with bootstrap intervals.
"""

from attnprune.selectivity import functional
from attnprune.selectivity.analysis import SelectivityAnalyzer, layer_states, oracle_importance
from attnprune.selectivity.metrics import (
    EffectiveShare,
    Gini,
    HeadAgreement,
    MaxWeight,
    MeanOverRows,
    NormalizedEntropy,
    RankStability,
    TopKMass,
    TopKOverlap,
)
from attnprune.selectivity.transition import attention_transition_depth, transition_depth

__all__ = [
    "functional",
    "MeanOverRows",
    "NormalizedEntropy",
    "Gini",
    "TopKMass",
    "EffectiveShare",
    "MaxWeight",
    "HeadAgreement",
    "RankStability",
    "TopKOverlap",
    "SelectivityAnalyzer",
    "layer_states",
    "oracle_importance",
    "attention_transition_depth",
    "transition_depth",
]
