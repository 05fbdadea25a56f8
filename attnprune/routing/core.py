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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attnprune.atomic import write_text_atomic
from attnprune.errors import UserError, UserTypeError, check_number
from attnprune.routing.presets import RoutingPresets, baseline_layers
from attnprune.routing.rules import LayerPlan, Rule, check_rule, fail, plan_rule
from attnprune.strict_yaml import load_yaml

__all__ = ["Routing", "PRESETS"]

_ROUTING_FIELDS = ("name", "rules", "prop_attn", "seed")
MAX_SEED = 2**32 - 1  # the random scorer seeds a torch generator with seed * 1_000_003 + layer


@dataclass(frozen=True)
class Routing(RoutingPresets):
    """An ordered, validated list of per-layer rules.

    Args:
        rules: the rules, at most one per layer (sorted by layer on construction).
        name: a label for tables and plots.
        prop_attn: add log(token size) to the attention logits once tokens have been averaged together
            (ToMe's proportional attention).
        seed: seed of the ``random`` scorer, an integer in [0, 2**32 - 1].

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
        check_number("routing field 'seed'", self.seed, 0, MAX_SEED, integer=True)
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
        rules = d.get("rules", [])
        if not isinstance(rules, (list, tuple)):
            got = "nothing (an empty 'rules:')" if rules is None else f"{type(rules).__name__} {rules!r}"
            raise UserError(f"routing field 'rules' must be a list of rules ([] for none), got {got}")
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
            return cls.from_dict(load_yaml(path.read_text()))
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
            write_text_atomic(path, text)
        return text

    # ------------------------------------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, spec: Routing | dict | str | Path | None, depth: int | None = None) -> Routing:
        """The routing ``spec`` names, as every entry point reads it.

        Args:
            spec: a Routing (returned as is); None or ``"unpruned"`` (no pruning); a dict (:meth:`from_dict`); a
                preset spec, the preset's name then ``key=value`` arguments after a colon, separated by commas
                (:data:`PRESETS`: ``tome:r=13``, ``evit:keep=0.7``, ``random:keep=0.7,seed=1``); or the path of a
                routing YAML file (:meth:`from_yaml`). ``evit``, ``topk_attention``, ``random`` and ``layerwise``
                prune at EViT's layers scaled to the depth (:func:`baseline_layers`) and ``mctf`` in every block but
                the first (its off-the-shelf layers) unless ``layers=2-5-8`` says otherwise.
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
    "ppt": "ppt:r=<tokens removed per layer>,threshold=<variance>[,layers=3-6-9]",
    "pitome": "pitome:ratio=<fraction kept per block>",
    "mctf": "mctf:r=<tokens merged per layer>[,layers=1-2-3]",
    "diffrate": "diffrate:file=<compression_rate.json>,model=<key>,gflops=<budget>",
}
"""The routing presets by name, each with its spec syntax (see :meth:`Routing.parse`); ``unpruned`` takes none."""

_ARGUMENTS = {  # preset -> (required, optional) arguments
    "tome": ({"r"}, set()),
    "evit": ({"keep"}, {"layers"}),
    "topk_attention": ({"keep"}, {"layers"}),
    "random": ({"keep"}, {"layers", "seed"}),
    "layerwise": ({"keep"}, {"layers"}),
    "ppt": ({"r", "threshold"}, {"layers"}),
    "pitome": ({"ratio"}, set()),
    "mctf": ({"r"}, {"layers"}),
    "diffrate": ({"file", "model", "gflops"}, set()),
}


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
    required, optional = _ARGUMENTS[name]
    unknown = sorted(set(args) - required - optional)
    if unknown:
        raise UserError(f"routing preset {spec!r}: unknown argument {unknown[0]!r} ({PRESETS[name]})")
    missing = sorted(required - set(args))
    if missing:
        raise UserError(f"routing preset {spec!r} needs {missing[0]}=... ({PRESETS[name]})")
    if depth is None and name != "diffrate" and (name in ("tome", "pitome") or "layers" not in args):
        raise UserError(f"routing preset {spec!r} needs the model's depth (Routing.parse(spec, depth))")
    try:
        return _build(name, args, depth)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"routing preset {spec!r}: {err} ({PRESETS[name]})") from err


def _build(name: str, args: dict[str, str], depth: int | None) -> Routing:
    """The preset's routing from its checked arguments (a ``ValueError`` for a value that does not convert)."""
    if name == "tome":
        return Routing.tome(int(args["r"]), depth)
    if name == "pitome":
        return Routing.pitome(float(args["ratio"]), depth)
    if name == "diffrate":
        return Routing.diffrate_schedule(args["file"], args["model"], float(args["gflops"]))
    layers = tuple(int(layer) for layer in args["layers"].split("-")) if "layers" in args else None
    if name == "mctf":
        return Routing.mctf(int(args["r"]), layers or range(1, depth))  # off the shelf: every block but the first
    layers = layers or baseline_layers(depth)
    if name == "ppt":
        return Routing.ppt(int(args["r"]), layers, float(args["threshold"]))
    keep = float(args["keep"])
    if name == "evit":
        return Routing.evit(keep, layers)
    if name == "topk_attention":
        return Routing.topk_attention(keep, layers)
    if name == "layerwise":
        return Routing.layerwise(keep, layers)
    return Routing.random(keep, layers, seed=int(args.get("seed", 0)))
