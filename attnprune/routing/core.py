"""Routing: the static, per-layer token-pruning contract.

A :class:`Routing` is an ordered list of :class:`Rule` s. Each rule says, for one transformer block, which scorer
ranks the tokens, how many non-prefix tokens survive and which reducer removes the rest. Token counts are resolved
once from the input size (:meth:`Routing.resolve`), so every image in a batch keeps the same number of tokens.

Baselines are presets: ToMe (Bolya et al., 2023) is ``merge`` with ``r`` in every block, EViT (Liang et al., 2022)
is ``cls_attention`` + ``fuse`` at three blocks, uniform attention top-k is ``cls_attention`` + ``drop``. Every entry
point names a routing the same way (:meth:`Routing.parse`): ``unpruned``, a preset spec such as ``tome:r=13`` or
``evit:keep=0.7`` (:data:`PRESETS`), or the path of a routing YAML file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attnprune.errors import UserError, UserTypeError
from attnprune.routing.rules import LayerPlan, Rule, check_rule, fail, is_int, max_merge, plan_rule

__all__ = ["Routing", "PRESETS", "baseline_layers"]

_ROUTING_FIELDS = ("name", "rules", "prop_attn", "seed")


@dataclass(frozen=True)
class Routing:
    """An ordered, validated list of per-layer rules.

    Args:
        rules: the rules, at most one per layer (sorted by layer on construction).
        name: a label for tables and plots.
        prop_attn: add log(token size) to the attention logits once tokens have been averaged together
            (ToMe's proportional attention).
        seed: seed of the ``random`` scorer.

    Example:
        >>> routing = Routing.from_dict({"name": "mine", "rules": [
        ...     {"layer": 1, "score": "l2_norm", "keep": 0.75},
        ...     {"layer": 2, "r": 8, "reduce": "merge"},
        ... ]})
        >>> routing.token_counts(depth=4, num_tokens=64)  # tokens entering each block, then leaving the last
        [64, 64, 48, 40, 40]
        >>> plan = routing.resolve(depth=4, num_tokens=64)[1]
        >>> plan.rule, plan.n_in, plan.n_out
        (Rule(layer=2, r=8, reduce='merge'), 48, 40)
    """

    rules: tuple[Rule, ...] = ()
    name: str = "unpruned"
    prop_attn: bool = True
    seed: int = 0
    _by_layer: dict[int, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checked = [check_rule(i, rule) for i, rule in enumerate(self.rules)]
        seen: dict[int, int] = {}
        for i, rule in enumerate(checked):
            if rule.layer in seen:
                raise fail(i, "layer", f"repeats layer {rule.layer}, already used by rule {seen[rule.layer]}")
            seen[rule.layer] = i
        if not isinstance(self.prop_attn, bool):
            raise UserError(f"routing field 'prop_attn' must be true or false, got {self.prop_attn!r}")
        if not is_int(self.seed):
            raise UserError(f"routing field 'seed' must be an integer, got {self.seed!r}")
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
            raise UserError(f"a routing must be a mapping with fields {_ROUTING_FIELDS}, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_ROUTING_FIELDS))
        if unknown:
            raise UserError(f"routing field '{unknown[0]}' is unknown (expected one of {', '.join(_ROUTING_FIELDS)})")
        rules = d.get("rules") or []
        if not isinstance(rules, (list, tuple)):
            raise UserError(f"routing field 'rules' must be a list of rules, got {type(rules).__name__}")
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
            raise UserError(f"{path}: {err}") from err

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
        bad = [ri for ri in schedule if not is_int(ri) or ri < 0]
        if bad:
            raise UserError(f"ToMe's r must be an integer >= 0 (tokens merged per block), got r={bad[0]!r}")
        if len(schedule) != depth:
            raise UserError(f"ToMe schedule has {len(schedule)} values of r for a model of depth {depth}")
        if num_tokens is not None:
            if not is_int(num_tokens) or num_tokens < 1:
                raise UserError(f"ToMe's num_tokens must be an integer >= 1, got num_tokens={num_tokens!r}")
            capped, n = [], num_tokens
            for ri in schedule:
                capped.append(min(ri, max_merge(n)))
                n -= capped[-1]
            schedule = capped
        rules = tuple(Rule(layer=i, r=ri, reduce="merge") for i, ri in enumerate(schedule) if ri > 0)
        return cls(rules, name=f"tome-r{r}" if is_int(r) else "tome", prop_attn=prop_attn)

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

    @classmethod
    def layerwise(cls, keep: float, layers: Sequence[int], first_keep: float | None = None) -> Routing:
        """The per-layer choice attnprune is built on, by hand: embedding statistics (``l2_norm``, ``drop``) at the
        first of ``layers``, where attention is still diffuse, and class-token attention with fusion at the others.

        Args:
            keep: keep fraction of the attention layers.
            layers: the pruning blocks, the first one scored by ``l2_norm``.
            first_keep: keep fraction of the first layer (default ``keep + 0.1``, at most 1).
        """
        first, *deeper = layers
        first_keep = min(1.0, round(keep + 0.1, 3)) if first_keep is None else first_keep
        rules = [Rule(layer=first, score="l2_norm", keep=first_keep, reduce="drop")]
        rules += [Rule(layer=layer, score="cls_attention", keep=keep, reduce="fuse") for layer in deeper]
        return cls(tuple(rules), name=f"layerwise-{keep:g}")

    # ------------------------------------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, spec: Routing | dict | str | Path | None, depth: int | None = None) -> Routing:
        """The routing ``spec`` names, as every entry point reads it.

        Args:
            spec: a Routing (returned as is); None or ``"unpruned"`` (no pruning); a dict (:meth:`from_dict`); a
                preset spec, the preset's name then ``key=value`` arguments after a colon, separated by commas
                (:data:`PRESETS`: ``tome:r=13``, ``evit:keep=0.7``, ``random:keep=0.7,seed=1``); or the path of a
                routing YAML file (:meth:`from_yaml`). ``evit``, ``topk_attention``, ``random`` and ``layerwise``
                prune at EViT's layers scaled to the depth (:func:`baseline_layers`) unless ``layers=2-5-8`` says
                otherwise.
            depth: the model's number of blocks, which presets need.

        Raises:
            UserError: an unknown preset, a missing, repeated or unknown argument, a preset without ``depth``.
            UserTypeError: ``spec`` is none of the above.
            FileNotFoundError: neither a preset nor an existing file.

        Example:
            >>> [(rule.layer, rule.r, rule.reduce) for rule in Routing.parse("tome:r=2", depth=3).rules]
            [(0, 2, 'merge'), (1, 2, 'merge'), (2, 2, 'merge')]
            >>> [(rule.layer, rule.score, rule.keep) for rule in Routing.parse("evit:keep=0.7", depth=12).rules]
            [(3, 'cls_attention', 0.7), (6, 'cls_attention', 0.7), (9, 'cls_attention', 0.7)]
        """
        if spec is None or spec == "unpruned":
            return cls()
        if isinstance(spec, Routing):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, Path):
            return cls.from_yaml(spec)
        if not isinstance(spec, str):
            raise UserTypeError(
                f"a routing must be a Routing, a dict, a preset spec or the path of a routing YAML file, got "
                f"{type(spec).__name__}"
            )
        name, colon, arguments = spec.partition(":")
        if name not in PRESETS:
            if colon and not Path(spec).exists() and "/" not in name:
                raise UserError(f"unknown routing preset {name!r} in {spec!r}; presets: {', '.join(PRESETS.values())}")
            if not Path(spec).is_file():
                raise FileNotFoundError(
                    f"routing {spec!r} is neither a routing file nor a preset; presets: unpruned, "
                    f"{', '.join(PRESETS.values())}"
                )
            return cls.from_yaml(spec)
        return _preset(spec, name, arguments, depth)

    # ------------------------------------------------------------------------------------------ resolving
    def resolve(self, depth: int, num_tokens: int) -> list[LayerPlan]:
        """Static token counts of every rule for a model of ``depth`` blocks and ``num_tokens`` non-prefix tokens.

        Raises:
            UserError: a rule does not fit the model (layer beyond its depth, integer keep or r above the tokens
                left, a ``merge`` removing more than :func:`max_merge` allows); the message names the rule, the field
                and the largest value accepted.
        """
        plans, n = [], num_tokens
        for position, rule in enumerate(self.rules):
            if rule.layer >= depth:
                raise fail(position, "layer", f"is {rule.layer} but the model has {depth} blocks (0..{depth - 1})")
            plans.append(plan_rule(position, rule, n))
            n = plans[-1].n_out
        return plans

    def token_counts(self, depth: int, num_tokens: int) -> list[int]:
        """Non-prefix tokens entering each block and, last, leaving the final one (``depth + 1`` values)."""
        out = {plan.rule.layer: plan.n_out for plan in self.resolve(depth, num_tokens)}
        counts = [num_tokens]
        for layer in range(depth):
            counts.append(out.get(layer, counts[-1]))
        return counts


PRESETS = {
    "tome": "tome:r=<tokens merged per block>",
    "evit": "evit:keep=<fraction>[,layers=3-6-9]",
    "topk_attention": "topk_attention:keep=<fraction>[,layers=3-6-9]",
    "random": "random:keep=<fraction>[,layers=3-6-9][,seed=0]",
    "layerwise": "layerwise:keep=<fraction>[,layers=3-6-9]",
}
"""The routing presets by name, each with its spec syntax (see :meth:`Routing.parse`); ``unpruned`` takes none."""


def baseline_layers(depth: int) -> tuple[int, ...]:
    """EViT's three pruning layers (3, 6 and 9 of 12 blocks) scaled to ``depth`` blocks (fewer on shallow models,
    never beyond the last block).

    Example:
        >>> baseline_layers(12), baseline_layers(4)
        ((3, 6, 9), (1, 2, 3))
    """
    return tuple(sorted({min(depth - 1, max(1, round(depth * f))) for f in (0.25, 0.5, 0.75)}))


def _preset(spec: str, name: str, arguments: str, depth: int | None) -> Routing:
    """The routing of preset ``name`` with its ``key=value`` ``arguments`` (see :meth:`Routing.parse`)."""
    args: dict[str, str] = {}
    for item in filter(None, arguments.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise UserError(f"routing preset {spec!r}: argument {item!r} is not key=value ({PRESETS[name]})")
        if key.strip() in args:
            raise UserError(f"routing preset {spec!r}: argument {key.strip()!r} is given twice ({PRESETS[name]})")
        args[key.strip()] = value.strip()
    allowed = {"tome": {"r"}, "random": {"keep", "layers", "seed"}}.get(name, {"keep", "layers"})
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise UserError(f"routing preset {spec!r}: unknown argument {unknown[0]!r} ({PRESETS[name]})")
    required = "r" if name == "tome" else "keep"
    if required not in args:
        raise UserError(f"routing preset {spec!r} needs {required}=... ({PRESETS[name]})")
    if depth is None and (name == "tome" or "layers" not in args):
        raise UserError(f"routing preset {spec!r} needs the model's depth (Routing.parse(spec, depth))")
    try:
        if name == "tome":
            return Routing.tome(int(args["r"]), depth)
        keep = float(args["keep"])
        layers = tuple(int(layer) for layer in args["layers"].split("-")) if "layers" in args else None
        seed = int(args.get("seed", 0))
    except ValueError as err:
        raise UserError(f"routing preset {spec!r}: {err} ({PRESETS[name]})") from err
    layers = layers if layers is not None else baseline_layers(depth)
    if name == "evit":
        return Routing.evit(keep, layers)
    if name == "topk_attention":
        return Routing.topk_attention(keep, layers)
    if name == "layerwise":
        return Routing.layerwise(keep, layers)
    return Routing.random(keep, layers, seed=seed)
