"""Token scorers, one module per family; import this package to fill the registry."""

from attnprune.scoring import attention, control, similarity, statistics  # noqa: F401  (they register)
from attnprune.scoring.context import ScoreContext
from attnprune.scoring.registry import SCORERS, Scorer, register_scorer

__all__ = ["SCORERS", "Scorer", "ScoreContext", "register_scorer"]
