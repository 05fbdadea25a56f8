"""The scorer registry: token-importance functions looked up by name from a routing rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from attnprune.scoring.context import ScoreContext

__all__ = ["Scorer", "SCORERS", "register_scorer"]

ScoreFn = Callable[[Tensor, ScoreContext], Tensor]
FlopsFn = Callable[[int, int, int], int]


@dataclass(frozen=True)
class Scorer:
    """A registered scorer.

    Attributes:
        name: registry key, as written in routing rules.
        family: ``attention``, ``statistics``, ``similarity`` or ``control``.
        fn: ``fn(x, ctx) -> Tensor[B, N_patch]``: non-negative importance of every non-prefix token, higher is more
            important (``fuse`` uses the scores as averaging weights).
        flops: ``flops(tokens, dim, heads)``: multiply-accumulates per image of the scorer itself, for ``tokens``
            tokens (prefix included) of width ``dim``.
        needs_attention: the scorer reads the full attention probabilities, so the block cannot use the fused
            attention kernel.
        needs_class_token: the scorer reads the class token (the model must have one).
    """

    name: str
    family: str
    fn: ScoreFn
    flops: FlopsFn
    needs_attention: bool = False
    needs_class_token: bool = False

    def __call__(self, x: Tensor, ctx: ScoreContext) -> Tensor:
        return self.fn(x, ctx)


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str, family: str, flops: FlopsFn, needs_attention: bool = False, needs_class_token: bool = False
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a scoring function to :data:`SCORERS` under ``name``."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is registered twice")
        SCORERS[name] = Scorer(name, family, fn, flops, needs_attention, needs_class_token)
        return fn

    return wrap
