"""Attention selectivity: how concentrated and how stable attention is, per layer.

Every metric exists as a stateless function in :mod:`attnprune.selectivity.functional` and as a
``torchmetrics.Metric`` here that averages it over batches and DDP ranks.
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
]
