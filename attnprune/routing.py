"""Routing: the static, per-layer token-pruning contract.

A :class:`Routing` is an ordered list of :class:`Rule` s. Each rule says, for one transformer block, which scorer
ranks the tokens, how many non-prefix tokens survive and which reducer removes the rest. Token counts are resolved
once from the input size (:meth:`Routing.resolve`), so every image in a batch keeps the same number of tokens.

Baselines are presets: ToMe (Bolya et al., 2023) is ``merge`` with ``r`` in every block, EViT (Liang et al., 2022)
is ``cls_attention`` + ``fuse`` at three blocks, uniform attention top-k is ``cls_attention`` + ``drop``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attnprune.reduction import REDUCERS
from attnprune.scoring import SCORERS

__all__ = ["Rule", "Routing", "LayerPlan", "max_merge"]

_RULE_FIELDS = ("layer", "score", "keep", "r", "reduce")
_ROUTING_FIELDS = ("name", "rules", "prop_attn", "seed")


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
    ``n_in - n_out``)."""

    rule: Rule
    n_in: int
    n_keep: int
    n_out: int


def _fail(position: int, field_name: str, message: str) -> ValueError:
    return ValueError(f"routing rule {position}: field '{field_name}' {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rule(position: int, raw: Any) -> Rule:
    if isinstance(raw, Rule):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ValueError(f"routing rule {position}: expected a mapping with fields {_RULE_FIELDS}, got {raw!r}")
    unknown = sorted(set(raw) - set(_RULE_FIELDS))
    if unknown:
        raise _fail(position, unknown[0], f"is not a rule field (expected one of {', '.join(_RULE_FIELDS)})")
    if "layer" not in raw:
        raise _fail(position, "layer", "is missing")
    layer = raw["layer"]
    if not _is_int(layer) or layer < 0:
        raise _fail(position, "layer", f"must be a block index >= 0, got {layer!r}")
    reduce = raw.get("reduce", "drop")
    if reduce not in REDUCERS:
        raise _fail(position, "reduce", f"names unknown reducer {reduce!r} (known: {', '.join(sorted(REDUCERS))})")
    score = raw.get("score")
    if reduce == "merge":
        if score is not None:
            raise _fail(position, "score", f"must be omitted for reduce 'merge' (ToMe matches on keys), got {score!r}")
    elif score is None:
        raise _fail(position, "score", f"is required for reduce {reduce!r} (known: {', '.join(sorted(SCORERS))})")
    elif score not in SCORERS:
        raise _fail(position, "score", f"names unknown scorer {score!r} (known: {', '.join(sorted(SCORERS))})")
    keep, r = raw.get("keep"), raw.get("r")
    if (keep is None) == (r is None):
        raise _fail(position, "keep", f"or 'r' must be given, exactly one of them (got keep={keep!r}, r={r!r})")
    if keep is not None:
        if _is_int(keep):
            if keep < 1:
                raise _fail(position, "keep", f"as a token count must be >= 1, got {keep}")
        elif isinstance(keep, float):
            if not 0.0 < keep <= 1.0:
                raise _fail(position, "keep", f"as a fraction must be in (0, 1], got {keep}")
        else:
            raise _fail(position, "keep", f"must be a fraction (float) or a token count (int), got {keep!r}")
    if r is not None and (not _is_int(r) or r < 0):
        raise _fail(position, "r", f"must be an integer >= 0, got {r!r}")
    return Rule(layer=layer, score=score, keep=keep, r=r, reduce=reduce)


@dataclass(frozen=True)
class Routing:
    """An ordered, validated list of per-layer rules.

    Args:
        rules: the rules, at most one per layer (sorted by layer on construction).
        name: a label for tables and plots.
        prop_attn: add log(token size) to the attention logits once tokens have been averaged together
            (ToMe's proportional attention).
        seed: seed of the ``random`` scorer.
    """

    rules: tuple[Rule, ...] = ()
    name: str = "unpruned"
    prop_attn: bool = True
    seed: int = 0
    _by_layer: dict[int, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checked = [_check_rule(i, rule) for i, rule in enumerate(self.rules)]
        seen: dict[int, int] = {}
        for i, rule in enumerate(checked):
            if rule.layer in seen:
                raise _fail(i, "layer", f"repeats layer {rule.layer}, already used by rule {seen[rule.layer]}")
            seen[rule.layer] = i
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"routing field 'prop_attn' must be true or false, got {self.prop_attn!r}")
        if not _is_int(self.seed):
            raise ValueError(f"routing field 'seed' must be an integer, got {self.seed!r}")
        ordered = tuple(sorted(checked, key=lambda rule: rule.layer))
        object.__setattr__(self, "rules", ordered)
        object.__setattr__(self, "_by_layer", {rule.layer: rule for rule in ordered})

    def __len__(self) -> int:
        return len(self.rules)

    def rule_for(self, layer: int) -> Rule | None:
        """The rule of block ``layer``, or None."""
        return self._by_layer.get(layer)

    # ----------------------------------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Routing:
        """Build from ``{"name": ..., "rules": [{layer, score, keep | r, reduce}, ...], "prop_attn", "seed"}``."""
        if not isinstance(d, dict):
            raise ValueError(f"a routing must be a mapping with fields {_ROUTING_FIELDS}, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_ROUTING_FIELDS))
        if unknown:
            raise ValueError(f"routing field '{unknown[0]}' is unknown (expected one of {', '.join(_ROUTING_FIELDS)})")
        rules = d.get("rules") or []
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"routing field 'rules' must be a list of rules, got {type(rules).__name__}")
        return cls(
            rules=tuple(rules),
            name=str(d.get("name", "routing")),
            prop_attn=d.get("prop_attn", True),
            seed=d.get("seed", 0),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> Routing:
        """Load a routing YAML file (see ``configs/routing/``); errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing file {path} does not exist")
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()))
        except (ValueError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prop_attn": self.prop_attn,
            "seed": self.seed,
            "rules": [rule.to_dict() for rule in self.rules],
        }

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The routing as YAML (one flow-style line per rule); also written to ``path`` when given."""
        head = {k: v for k, v in self.to_dict().items() if k != "rules"}
        text = yaml.safe_dump(head, sort_keys=False)
        rules = [
            yaml.safe_dump(rule.to_dict(), default_flow_style=True, sort_keys=False).strip() for rule in self.rules
        ]
        text += "rules:" + ("".join(f"\n  - {rule}" for rule in rules) if rules else " []") + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    # -------------------------------------------------------------------------------------------- presets
    @classmethod
    def tome(cls, r: int | Sequence[int], depth: int, prop_attn: bool = True, num_tokens: int | None = None) -> Routing:
        """ToMe: bipartite soft matching removing ``r`` tokens in every block (or ``r[i]`` in block i).

        Args:
            r: tokens merged per block, or one value per block.
            depth: the model's number of blocks.
            prop_attn: proportional attention.
            num_tokens: the model's non-prefix tokens; when given, each block's r is capped at what bipartite
                matching can merge there (:func:`max_merge`), as the official ToMe caps it, and the rules say the
                capped values. Without it an r too large for the tokens left fails when the routing is applied.
        """
        schedule = list(r) if isinstance(r, (list, tuple)) else [r] * depth
        bad = [ri for ri in schedule if not _is_int(ri) or ri < 0]
        if bad:
            raise ValueError(f"ToMe's r must be an integer >= 0 (tokens merged per block), got r={bad[0]!r}")
        if len(schedule) != depth:
            raise ValueError(f"ToMe schedule has {len(schedule)} values of r for a model of depth {depth}")
        if num_tokens is not None:
            if not _is_int(num_tokens) or num_tokens < 1:
                raise ValueError(f"ToMe's num_tokens must be an integer >= 1, got num_tokens={num_tokens!r}")
            capped, n = [], num_tokens
            for ri in schedule:
                capped.append(min(ri, max_merge(n)))
                n -= capped[-1]
            schedule = capped
        rules = tuple(Rule(layer=i, r=ri, reduce="merge") for i, ri in enumerate(schedule) if ri > 0)
        return cls(rules, name=f"tome-r{r}" if _is_int(r) else "tome", prop_attn=prop_attn)

    @classmethod
    def evit(cls, keep: float = 0.7, layers: Sequence[int] = (3, 6, 9)) -> Routing:
        """EViT: keep the tokens the CLS token attends to most, fuse the rest into one token (no prop. attention)."""
        rules = tuple(Rule(layer=i, score="cls_attention", keep=keep, reduce="fuse") for i in layers)
        return cls(rules, name=f"evit-{keep:g}", prop_attn=False)

    @classmethod
    def topk_attention(cls, keep: float, layers: Sequence[int]) -> Routing:
        """Uniform attention top-k: keep the tokens the CLS token attends to most, drop the rest."""
        rules = tuple(Rule(layer=i, score="cls_attention", keep=keep, reduce="drop") for i in layers)
        return cls(rules, name=f"topk-attention-{keep:g}")

    @classmethod
    def random(cls, keep: float, layers: Sequence[int], seed: int = 0) -> Routing:
        """Control: keep a seeded random subset of tokens at each layer."""
        rules = tuple(Rule(layer=i, score="random", keep=keep, reduce="drop") for i in layers)
        return cls(rules, name=f"random-{keep:g}", seed=seed)

    # ------------------------------------------------------------------------------------------ resolving
    def resolve(self, depth: int, num_tokens: int) -> list[LayerPlan]:
        """Static token counts of every rule for a model of ``depth`` blocks and ``num_tokens`` non-prefix tokens.

        Raises:
            ValueError: a rule does not fit the model (layer beyond its depth, integer keep or r above the tokens
                left, a ``merge`` removing more than :func:`max_merge` allows); the message names the rule, the field
                and the largest value accepted.
        """
        plans, n = [], num_tokens
        for position, rule in enumerate(self.rules):
            if rule.layer >= depth:
                raise _fail(position, "layer", f"is {rule.layer} but the model has {depth} blocks (0..{depth - 1})")
            if rule.reduce == "merge":
                # Bipartite matching can merge at most half of the tokens: more is an error, never clipped.
                field_name = "r" if rule.r is not None else "keep"
                removed = rule.r if rule.r is not None else n - _keep_count(position, rule.keep, n)
                if removed > max_merge(n):
                    asked = f"r={rule.r}" if rule.r is not None else f"keep={rule.keep!r} (r={removed})"
                    raise _fail(
                        position,
                        field_name,
                        f"merges too many tokens at layer {rule.layer}: {asked}, but with {n} non-prefix tokens "
                        f"reaching it bipartite matching merges at most r={max_merge(n)}",
                    )
                plans.append(LayerPlan(rule, n, n - removed, n - removed))
            else:
                if rule.keep is not None:
                    n_keep = _keep_count(position, rule.keep, n)
                else:
                    # fuse adds one token, so it keeps one token less to remove r in all
                    n_keep = n - rule.r - (rule.reduce == "fuse" and rule.r > 0)
                    if n_keep < (rule.reduce == "drop"):
                        raise _fail(
                            position,
                            "r",
                            f"removes {rule.r} tokens but only {n} non-prefix tokens reach layer {rule.layer} "
                            f"(at most r={max(n - 1, 0)})",
                        )
                fused = rule.reduce == "fuse" and n_keep < n
                plans.append(LayerPlan(rule, n, n_keep, n_keep + fused))
            n = plans[-1].n_out
        return plans

    def token_counts(self, depth: int, num_tokens: int) -> list[int]:
        """Non-prefix tokens entering each block and, last, leaving the final one (``depth + 1`` values)."""
        out = {plan.rule.layer: plan.n_out for plan in self.resolve(depth, num_tokens)}
        counts = [num_tokens]
        for layer in range(depth):
            counts.append(out.get(layer, counts[-1]))
        return counts


def as_routing(routing: Routing | dict | str | Path | None, argument: str = "routing") -> Routing | None:
    """``routing`` as a :class:`Routing`: a Routing or None as is, a dict (``Routing.from_dict``) or the path of a
    routing YAML file (``Routing.from_yaml``).

    Raises:
        TypeError: anything else, naming ``argument``.
    """
    if routing is None or isinstance(routing, Routing):
        return routing
    if isinstance(routing, dict):
        return Routing.from_dict(routing)
    if isinstance(routing, (str, Path)):
        return Routing.from_yaml(routing)
    raise TypeError(
        f"{argument} must be a Routing, a dict or the path of a routing YAML file, got {type(routing).__name__}"
    )


def max_merge(num_tokens: int) -> int:
    """The most tokens a ``merge`` rule removes from ``num_tokens`` non-prefix tokens: bipartite matching pairs set A
    with set B, so at most half of them (ToMe's own limit)."""
    return num_tokens // 2


def _keep_count(position: int, keep: float | int, n: int) -> int:
    if isinstance(keep, float):
        return max(1, math.ceil(keep * n - 1e-9))  # the epsilon absorbs float noise such as 0.7 * 10 = 7.000001
    if keep > n:
        raise _fail(
            position,
            "keep",
            f"asks for {keep} tokens but only {n} non-prefix tokens reach this layer (at most keep={n})",
        )
    return keep
