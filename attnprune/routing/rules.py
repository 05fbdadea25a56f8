"""A routing rule: what one transformer block does to its tokens, validated field by field, and its plan for a
given input (the static token counts)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from attnprune.errors import UserError
from attnprune.reduction import REDUCERS
from attnprune.scoring import SCORERS

__all__ = [
    "Rule",
    "LayerPlan",
    "OPTION_FIELDS",
    "RULE_FIELDS",
    "check_rule",
    "fail",
    "is_int",
    "keep_count",
    "max_merge",
    "plan_rule",
]

OPTION_FIELDS = ("prune", "threshold", "margin")
RULE_FIELDS = ("layer", "score", "keep", "r", "reduce", *OPTION_FIELDS)


@dataclass(frozen=True)
class Rule:
    """What one block does to its tokens.

    Args:
        layer: 0-based block index; tokens are reduced after attention, before the MLP.
        score: scorer registry key ranking the tokens (``drop``, ``fuse``); ``merge`` matches on the attention
            keys as ToMe does and takes no scorer.
        keep: fraction in (0, 1] of the non-prefix tokens reaching the block (a float), or a token count (an int).
        r: tokens removed in this block (ToMe's knob); exactly one of ``keep`` and ``r`` is given.
        reduce: reducer registry key (:data:`attnprune.REDUCERS`): ``drop``, ``fuse``, ``merge``, ...
        prune: for a reducer that prunes and then merges: the tokens left after pruning (a fraction of those reaching
            the block, or a count), from which it merges down to ``keep``; default: no pruning.
        threshold: for a reducer that chooses per image (PPT's): the score variance from which it prunes.
        margin: for an energy-based merge (PiToMe's): the similarity margin of the energy score.

    Example:
        >>> Rule(layer=2, score="l2_norm", keep=0.8).to_dict()
        {'layer': 2, 'score': 'l2_norm', 'keep': 0.8, 'reduce': 'drop'}
        >>> Rule(layer=5, r=8, reduce="merge").to_dict()  # ToMe's knob: 8 tokens merged in block 5
        {'layer': 5, 'r': 8, 'reduce': 'merge'}
    """

    layer: int
    score: str | None = None
    keep: float | int | None = None
    r: int | None = None
    reduce: str = "drop"
    prune: float | int | None = None
    threshold: float | None = None
    margin: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (YAML's and JSON's form of the rule)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __repr__(self) -> str:
        return f"Rule({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


@dataclass(frozen=True)
class LayerPlan:
    """A rule resolved for a given input: ``n_in`` non-prefix tokens enter, ``n_keep`` survive the scorer's
    selection (``drop``/``fuse``) and ``n_out`` leave the block (``fuse`` adds one token, ``merge`` removes
    ``n_in - n_out``); a reducer that prunes and then merges prunes to ``n_pruned`` first.

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
    n_pruned: int | None = None

    def options(self) -> dict[str, Any]:
        """The keyword arguments its reducer reads besides the counts: the rule's options, ``prune`` resolved to
        ``n_pruned``."""
        given = {name: getattr(self.rule, name) for name in REDUCERS[self.rule.reduce].options}
        if "prune" in given:
            given["n_pruned"] = self.n_pruned if self.n_pruned is not None else self.n_in
            del given["prune"]
        return given


def fail(position: int, field_name: str, message: str) -> UserError:
    return UserError(f"routing rule {position}: field '{field_name}' {message}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rule(position: int, raw: Any) -> Rule:
    if isinstance(raw, Rule):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise UserError(
            f"routing rule {position}: expected a mapping with fields (layer, score, keep, r, reduce, ...), got {raw!r}"
        )
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
    reducer = REDUCERS[reduce]
    score = raw.get("score")
    if not reducer.takes_score:
        if score is not None:
            raise fail(
                position,
                "score",
                f"must be omitted for reduce {reduce!r} (it matches on {reducer.metric}), got {score!r}",
            )
    elif score is None:
        raise fail(position, "score", f"is required for reduce {reduce!r} (known: {', '.join(sorted(SCORERS))})")
    elif score not in SCORERS:
        raise fail(position, "score", f"names unknown scorer {score!r} (known: {', '.join(sorted(SCORERS))})")
    options = _check_options(position, raw, reducer)
    keep, r = raw.get("keep"), raw.get("r")
    if (keep is None) == (r is None):
        raise fail(position, "keep", f"or 'r' must be given, exactly one of them (got keep={keep!r}, r={r!r})")
    if keep is not None:
        _check_count(position, "keep", keep)
    if r is not None and (not is_int(r) or r < 0):
        raise fail(position, "r", f"must be an integer >= 0, got {r!r}")
    return Rule(layer=layer, score=score, keep=keep, r=r, reduce=reduce, **options)


def _check_options(position: int, raw: dict[str, Any], reducer: Any) -> dict[str, Any]:
    """The options the reducer reads, given where it requires them and valid, no other option given; returned with
    numbers written as text read as numbers (YAML reads ``7e-5``, without a dot, as a string)."""
    options = {}
    for name in OPTION_FIELDS:
        value = raw.get(name)
        if isinstance(value, str) and name != "prune":
            try:
                value = float(value)
            except ValueError:
                pass
        if value is None:
            if name in reducer.required:
                raise fail(position, name, f"is required for reduce {reducer.name!r}")
            continue
        if name not in reducer.options:
            readers = sorted(r.name for r in REDUCERS.values() if name in r.options) or ["none"]
            raise fail(position, name, f"is not read by reduce {reducer.name!r} (read by: {', '.join(readers)})")
        if name == "prune":
            _check_count(position, name, value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(position, name, f"must be a finite number, got {value!r}")
        elif name == "threshold" and value < 0:
            raise fail(position, name, f"must be >= 0 (a variance), got {value!r}")
        elif name == "margin" and not -1.0 <= value <= 1.0:
            raise fail(position, name, f"must be in [-1, 1] (a cosine similarity), got {value!r}")
        options[name] = value
    return options


def _check_count(position: int, name: str, value: Any) -> None:
    """A token count (int >= 1) or a fraction in (0, 1] (float)."""
    if is_int(value):
        if value < 1:
            raise fail(position, name, f"as a token count must be >= 1, got {value}")
    elif isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise fail(position, name, f"as a fraction must be in (0, 1], got {value}")
    else:
        raise fail(position, name, f"must be a fraction (float) or a token count (int), got {value!r}")


def max_merge(num_tokens: int) -> int:
    """The most tokens a ``merge`` rule removes from ``num_tokens`` non-prefix tokens: bipartite matching pairs set A
    with set B, so at most half of them (ToMe's own limit)."""
    return num_tokens // 2


def keep_count(position: int, keep: float | int, n: int, field_name: str = "keep") -> int:
    """Tokens kept of ``n`` by a fraction (rounded up, at least one) or a count (at most ``n``)."""
    if isinstance(keep, float):
        return max(1, math.ceil(keep * n - 1e-9))  # the epsilon absorbs float noise such as 0.7 * 10 = 7.000001
    if keep > n:
        raise fail(
            position,
            field_name,
            f"asks for {keep} tokens but only {n} non-prefix tokens reach this layer (at most {field_name}={n})",
        )
    return keep


def plan_rule(position: int, rule: Rule, n: int) -> LayerPlan:
    """``rule`` resolved for ``n`` non-prefix tokens reaching its block.

    Raises:
        UserError: a count does not fit: an integer keep or r above the tokens left, a matching reducer removing
            more than it can (bipartite matching: half), a prune below keep; the message names the rule, the field
            and the largest value accepted.
    """
    reducer = REDUCERS[rule.reduce]
    if reducer.max_removed is not None:
        # Matching can remove at most its limit (bipartite matching: half of the tokens): more is an error, never
        # clipped.
        field_name = "r" if rule.r is not None else "keep"
        removed = rule.r if rule.r is not None else n - keep_count(position, rule.keep, n)
        if removed > reducer.max_removed(n):
            asked = f"r={rule.r}" if rule.r is not None else f"keep={rule.keep!r} (r={removed})"
            raise fail(
                position,
                field_name,
                f"merges too many tokens at layer {rule.layer}: {asked}, but with {n} non-prefix tokens "
                f"reaching it {rule.reduce!r} merges at most r={reducer.max_removed(n)}",
            )
        return LayerPlan(rule, n, n - removed, n - removed)
    if rule.keep is not None:
        n_keep = keep_count(position, rule.keep, n)
    else:
        # a reducer that appends tokens (fuse) keeps fewer to remove r in all
        n_keep = n - rule.r - (reducer.added if rule.r > 0 else 0)
        if n_keep < (0 if reducer.added else 1):
            raise fail(
                position,
                "r",
                f"removes {rule.r} tokens but only {n} non-prefix tokens reach layer {rule.layer} "
                f"(at most r={max(n - 1, 0)})",
            )
    n_pruned = None
    if rule.prune is not None:
        n_pruned = keep_count(position, rule.prune, n, "prune")
        if n_pruned < n_keep:
            raise fail(
                position,
                "prune",
                f"keeps {n_pruned} tokens by pruning but the rule keeps {n_keep} after merging (prune >= keep)",
            )
    added = reducer.added if n_keep < n else 0
    return LayerPlan(rule, n, n_keep, n_keep + added, n_pruned)
