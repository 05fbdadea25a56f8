"""A routing rule: what one transformer block does to its tokens, validated field by field, and its plan for a
given input (the static token counts)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from attnprune.errors import UserError
from attnprune.reduction import REDUCERS
from attnprune.scoring import SCORERS

__all__ = ["Rule", "LayerPlan", "RULE_FIELDS", "check_rule", "fail", "is_int", "keep_count", "max_merge"]

RULE_FIELDS = ("layer", "score", "keep", "r", "reduce")


@dataclass(frozen=True)
class Rule:
    """What one block does to its tokens.

    Args:
        layer: 0-based block index; tokens are reduced after attention, before the MLP.
        score: scorer registry key ranking the tokens (``drop``, ``fuse``); ``merge`` matches on the attention
            keys as ToMe does and takes no scorer.
        keep: fraction in (0, 1] of the non-prefix tokens reaching the block (a float), or a token count (an int).
        r: tokens removed in this block (ToMe's knob); exactly one of ``keep`` and ``r`` is given.
        reduce: reducer registry key: ``drop``, ``fuse`` or ``merge``.

    Example:
        >>> Rule(layer=2, score="l2_norm", keep=0.8).to_dict()
        {'layer': 2, 'score': 'l2_norm', 'keep': 0.8, 'reduce': 'drop'}
        >>> Rule(layer=5, r=8, reduce="merge")  # ToMe's knob: 8 tokens merged in block 5
        Rule(layer=5, score=None, keep=None, r=8, reduce='merge')
    """

    layer: int
    score: str | None = None
    keep: float | int | None = None
    r: int | None = None
    reduce: str = "drop"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class LayerPlan:
    """A rule resolved for a given input: ``n_in`` non-prefix tokens enter, ``n_keep`` survive the scorer's
    selection (``drop``/``fuse``) and ``n_out`` leave the block (``fuse`` adds one token, ``merge`` removes
    ``n_in - n_out``).

    Example:
        >>> from attnprune import Routing
        >>> [plan] = Routing((Rule(layer=1, score="cls_attention", keep=0.5, reduce="fuse"),)).resolve(4, 64)
        >>> plan.n_in, plan.n_keep, plan.n_out  # fuse keeps 32 tokens and adds the fused one
        (64, 32, 33)
    """

    rule: Rule
    n_in: int
    n_keep: int
    n_out: int


def fail(position: int, field_name: str, message: str) -> UserError:
    return UserError(f"routing rule {position}: field '{field_name}' {message}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rule(position: int, raw: Any) -> Rule:
    if isinstance(raw, Rule):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise UserError(f"routing rule {position}: expected a mapping with fields {RULE_FIELDS}, got {raw!r}")
    unknown = sorted(set(raw) - set(RULE_FIELDS))
    if unknown:
        raise fail(position, unknown[0], f"is not a rule field (expected one of {', '.join(RULE_FIELDS)})")
    if "layer" not in raw:
        raise fail(position, "layer", "is missing")
    layer = raw["layer"]
    if not is_int(layer) or layer < 0:
        raise fail(position, "layer", f"must be a block index >= 0, got {layer!r}")
    reduce = raw.get("reduce", "drop")
    if reduce not in REDUCERS:
        raise fail(position, "reduce", f"names unknown reducer {reduce!r} (known: {', '.join(sorted(REDUCERS))})")
    score = raw.get("score")
    if reduce == "merge":
        if score is not None:
            raise fail(position, "score", f"must be omitted for reduce 'merge' (ToMe matches on keys), got {score!r}")
    elif score is None:
        raise fail(position, "score", f"is required for reduce {reduce!r} (known: {', '.join(sorted(SCORERS))})")
    elif score not in SCORERS:
        raise fail(position, "score", f"names unknown scorer {score!r} (known: {', '.join(sorted(SCORERS))})")
    keep, r = raw.get("keep"), raw.get("r")
    if (keep is None) == (r is None):
        raise fail(position, "keep", f"or 'r' must be given, exactly one of them (got keep={keep!r}, r={r!r})")
    if keep is not None:
        if is_int(keep):
            if keep < 1:
                raise fail(position, "keep", f"as a token count must be >= 1, got {keep}")
        elif isinstance(keep, float):
            if not 0.0 < keep <= 1.0:
                raise fail(position, "keep", f"as a fraction must be in (0, 1], got {keep}")
        else:
            raise fail(position, "keep", f"must be a fraction (float) or a token count (int), got {keep!r}")
    if r is not None and (not is_int(r) or r < 0):
        raise fail(position, "r", f"must be an integer >= 0, got {r!r}")
    return Rule(layer=layer, score=score, keep=keep, r=r, reduce=reduce)


def max_merge(num_tokens: int) -> int:
    """The most tokens a ``merge`` rule removes from ``num_tokens`` non-prefix tokens: bipartite matching pairs set A
    with set B, so at most half of them (ToMe's own limit)."""
    return num_tokens // 2


def keep_count(position: int, keep: float | int, n: int) -> int:
    if isinstance(keep, float):
        return max(1, math.ceil(keep * n - 1e-9))  # the epsilon absorbs float noise such as 0.7 * 10 = 7.000001
    if keep > n:
        raise fail(
            position,
            "keep",
            f"asks for {keep} tokens but only {n} non-prefix tokens reach this layer (at most keep={n})",
        )
    return keep
