"""The presets of :class:`~attnprune.routing.Routing`: the baselines and peers as routings of the same contract.

- ToMe (Bolya et al., 2023): ``merge`` with ``r`` in every block;
- EViT (Liang et al., 2022): ``cls_attention`` + ``fuse`` at three blocks; uniform attention top-k: ``drop``;
- the layer-wise routing by hand (statistics first, attention deeper) and the random control;
- PPT (Wu et al., 2023): per image, prune by class-token attention times value norm where the scores are spread
  out, merge as ToMe where they are flat (``adaptive``);
- DiffRate (Chen et al., ICCV 2023): per block, prune by class-token attention, then merge each further token into
  its most similar kept one (``absorb``), with the kept counts of its published schedules;
- PiToMe (Tran et al., NeurIPS 2024): merge by an energy score that protects isolated tokens (``energy_merge``,
  ``energy_bipartite``);
- MCTF (Lee et al., CVPR 2024): merge before attention by similarity, informativeness and size, two ways, with the
  block's attention merged along (``mctf``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from attnprune.errors import UserError
from attnprune.routing.rules import Rule, is_int, max_merge

__all__ = ["RoutingPresets", "baseline_layers"]

R = TypeVar("R", bound="RoutingPresets")


class RoutingPresets:
    """The preset constructors, inherited by :class:`~attnprune.routing.Routing` (``cls`` is the routing class)."""

    @classmethod
    def tome(
        cls: type[R], r: int | Sequence[int], depth: int, prop_attn: bool = True, num_tokens: int | None = None
    ) -> R:
        """ToMe: bipartite soft matching removing ``r`` tokens in every block (or ``r[i]`` in block i).

        Args:
            r: tokens merged per block, or one value per block.
            depth: the model's number of blocks.
            prop_attn: proportional attention.
            num_tokens: the model's non-prefix tokens; when given, each block's r is capped at what bipartite
                matching can merge there (:func:`max_merge`), as the official ToMe caps it, and the rules say the
                capped values. Without it an r too large for the tokens left fails when the routing is applied.
        """
        if not is_int(depth) or depth < 1:
            raise UserError(f"ToMe's depth must be the model's number of blocks (an integer >= 1), got {depth!r}")
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
    def evit(cls: type[R], keep: float = 0.7, layers: Sequence[int] = (3, 6, 9)) -> R:
        """EViT: keep the tokens the CLS token attends to most, fuse the rest into one token (no prop. attention)."""
        layers = _pruning_layers("EViT", layers)
        rules = tuple(Rule(layer=i, score="cls_attention", keep=keep, reduce="fuse") for i in layers)
        return cls(rules, name=f"evit-{keep:g}", prop_attn=False)

    @classmethod
    def topk_attention(cls: type[R], keep: float, layers: Sequence[int]) -> R:
        """Uniform attention top-k: keep the tokens the CLS token attends to most, drop the rest."""
        layers = _pruning_layers("attention top-k", layers)
        rules = tuple(Rule(layer=i, score="cls_attention", keep=keep, reduce="drop") for i in layers)
        return cls(rules, name=f"topk-attention-{keep:g}")

    @classmethod
    def random(cls: type[R], keep: float, layers: Sequence[int], seed: int = 0) -> R:
        """Control: keep a seeded random subset of tokens at each layer."""
        layers = _pruning_layers("the random control", layers)
        rules = tuple(Rule(layer=i, score="random", keep=keep, reduce="drop") for i in layers)
        return cls(rules, name=f"random-{keep:g}", seed=seed)

    @classmethod
    def layerwise(cls: type[R], keep: float, layers: Sequence[int], first_keep: float | None = None) -> R:
        """The per-layer choice attnprune is built on, by hand: embedding statistics (``l2_norm``, ``drop``) at the
        first of ``layers``, where attention is still diffuse, and class-token attention with fusion at the others.

        Args:
            keep: keep fraction of the attention layers.
            layers: the pruning blocks, the first one scored by ``l2_norm``.
            first_keep: keep fraction of the first layer (default ``keep + 0.1``, at most 1).
        """
        first, *deeper = _pruning_layers("the layer-wise routing", layers)
        first_keep = min(1.0, round(keep + 0.1, 3)) if first_keep is None else first_keep
        rules = [Rule(layer=first, score="l2_norm", keep=first_keep, reduce="drop")]
        rules += [Rule(layer=layer, score="cls_attention", keep=keep, reduce="fuse") for layer in deeper]
        return cls(tuple(rules), name=f"layerwise-{keep:g}")

    @classmethod
    def ppt(cls: type[R], r: int, layers: Sequence[int], threshold: float, num_tokens: int | None = None) -> R:
        """PPT: at each of ``layers``, remove ``r`` tokens per image by pruning where the variance of its scores is
        high and by ToMe's merging where it is low.

        The scores are PPT's (``cls_value``): the class token's attention summed over heads times each token's
        value norm, normalised to sum to one over the patch tokens; an image whose scores have an unbiased variance
        of at least ``threshold`` keeps its ``n - r`` highest-scoring tokens, the others merge ``r`` tokens by
        bipartite soft matching on the keys (``adaptive``). Proportional attention is on, as in PPT's off-the-shelf
        evaluation.

        Args:
            r: tokens removed at each of ``layers`` (PPT's ``--r_tokens``).
            layers: the 0-based blocks that reduce (PPT's ``--pp_loc_list``), for example ``(3, 6, 9)``.
            threshold: the variance from which an image is pruned (PPT's ``--threshold``, 7e-5 for DeiT-S).
            num_tokens: the model's non-prefix tokens; when given, each layer's r is capped at half the tokens
                left there, as PPT's code caps it (DeiT-S with ``r=50`` at blocks 3, 6, 9 removes 48 at block 9),
                and the rules say the capped values. Without it an r too large for the tokens left fails when the
                routing is applied.

        Raises:
            UserError: ``r`` or ``num_tokens`` is not an integer >= 0 (>= 1); a bad threshold or layer names its
                rule and field.

        Example:
            >>> from attnprune import Routing
            >>> routing = Routing.ppt(8, (1, 2), threshold=7e-5)
            >>> routing.rules[0]
            Rule(layer=1, score='cls_value', r=8, reduce='adaptive', threshold=7e-05)
            >>> [rule.r for rule in Routing.ppt(20, (1, 2, 3), 7e-5, num_tokens=64).rules]  # 64 -> 44 -> 24 -> 12
            [20, 20, 12]
        """
        if not is_int(r) or r < 0:
            raise UserError(f"PPT's r must be an integer >= 0 (tokens removed per layer), got r={r!r}")
        layers = _pruning_layers("PPT", layers)
        schedule = _capped_schedule("PPT", r, layers, num_tokens, lambda n: min(r, max_merge(n)))
        rules = tuple(
            Rule(layer=layer, score="cls_value", r=schedule[layer], reduce="adaptive", threshold=threshold)
            for layer in layers
        )
        return cls(rules, name=f"ppt-r{r}", prop_attn=True)

    @classmethod
    def diffrate(cls: type[R], prune_kept: Sequence[int], merge_kept: Sequence[int]) -> R:
        """DiffRate: in block ``l``, prune to ``prune_kept[l]`` tokens by class-token attention, then merge down to
        ``merge_kept[l]``, each further token into its most similar kept token (``absorb``).

        The counts are those of DiffRate's ``compression_rate.json`` (``prune_kept_num``, ``merge_kept_num``): one
        per block, each *including the class token*, read as DiffRate's code reads them:

        - the first prune count is the tokens the schedule was made for (its published schedules reduce nothing in
          block 0): block 0's rule keeps that many, which removes nothing on the model the schedule is for, prunes a
          model with more tokens down to them as the code does, and is refused on a model with fewer;
        - a count above the tokens left keeps them all, so a count that rises reduces nothing, and a merge count at
          or above the tokens after pruning merges nothing;
        - a block that reduces nothing has no rule (block 0 aside) and a rule gives ``prune`` only where pruning
          removes tokens; proportional attention is on.

        Args:
            prune_kept: tokens left after pruning in each block, class token included (``prune_kept_num``).
            merge_kept: tokens left after merging in each block, class token included (``merge_kept_num``).

        Raises:
            UserError: lists of different lengths or empty, or a count that is not an integer >= 2 (the class token
                and at least one patch token).

        Example:
            >>> from attnprune import Routing
            >>> for rule in Routing.diffrate([65, 50, 60, 30], [65, 40, 35, 45]).rules:
            ...     print(rule)
            Rule(layer=0, score='cls_attention', keep=64, reduce='drop')
            Rule(layer=1, score='cls_attention', keep=39, reduce='absorb', prune=49)
            Rule(layer=2, score='cls_attention', keep=34, reduce='absorb')
            Rule(layer=3, score='cls_attention', keep=29, reduce='drop')
        """
        prune_kept, merge_kept = list(prune_kept), list(merge_kept)
        if not prune_kept or len(prune_kept) != len(merge_kept):
            raise UserError(
                f"DiffRate's prune_kept and merge_kept need one count per block each, got {len(prune_kept)} and "
                f"{len(merge_kept)} counts"
            )
        for name, counts in (("prune_kept", prune_kept), ("merge_kept", merge_kept)):
            bad = [(i, c) for i, c in enumerate(counts) if not is_int(c) or c < 2]
            if bad:
                raise UserError(
                    f"DiffRate's {name}[{bad[0][0]}] must be an integer >= 2 (tokens kept, the class token and at "
                    f"least one patch token), got {bad[0][1]!r}"
                )
        rules, tokens = [], prune_kept[0] - 1  # patch tokens: the class token is not a rule's to count
        for layer, (p, m) in enumerate(zip(prune_kept, merge_kept, strict=True)):
            pruned, merged = min(tokens, p - 1), m - 1
            prune = pruned if pruned < tokens or layer == 0 else None  # block 0 says the tokens the schedule is for
            if merged < pruned:
                rules.append(Rule(layer=layer, score="cls_attention", keep=merged, prune=prune, reduce="absorb"))
            elif prune is not None:
                rules.append(Rule(layer=layer, score="cls_attention", keep=pruned, reduce="drop"))
            tokens = min(pruned, merged)
        return cls(tuple(rules), name="diffrate", prop_attn=True)

    @classmethod
    def diffrate_schedule(cls: type[R], path: str | Path, model_key: str, gflops: float | str) -> R:
        """:meth:`diffrate` with a schedule of DiffRate's ``compression_rate.json``.

        Args:
            path: the JSON file, ``{model_key: {gflops: {"prune_kept_num": "[...]", "merge_kept_num": "[...]"}}}``
                (the counts as strings, as DiffRate writes them, or as lists).
            model_key: its model, for example ``ViT-S-DeiT`` or ``ViT-B-MAE``.
            gflops: the schedule's FLOPs budget as the file writes it, for example ``2.9`` (``"2.9"`` and ``2.90``
                name the same budget).

        Raises:
            FileNotFoundError: no such file.
            UserError: the file is not such JSON, the model or the budget is not in it (the message lists those that
                are), or the schedule's counts are not a ViT's (DiffRate's CAFormer schedules have no pruning).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DiffRate schedule file {path} does not exist")
        try:
            schedules = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not JSON: {err}") from err
        if not isinstance(schedules, dict) or not all(isinstance(budgets, dict) for budgets in schedules.values()):
            raise UserError(f"{path} is not a DiffRate schedule file ({{model: {{gflops: {{prune_kept_num, ...}}}}}})")
        if model_key not in schedules:
            raise UserError(f"{path} has no model {model_key!r} (it has: {', '.join(schedules)})")
        try:
            budget = float(gflops)
            budgets = {float(key): key for key in schedules[model_key]}
        except (TypeError, ValueError) as err:
            raise UserError(f"DiffRate's budgets are numbers (GFLOPs): gflops={gflops!r} or a key of {path}") from err
        if budget not in budgets:
            known = ", ".join(f"{b:g}" for b in sorted(budgets))
            raise UserError(f"{path} has no {model_key} schedule at {gflops} GFLOPs (it has: {known})")
        where, entry = f"{path}: {model_key} at {budgets[budget]} GFLOPs", schedules[model_key][budgets[budget]]
        counts = {}
        for field in ("prune_kept_num", "merge_kept_num"):
            raw = entry.get(field) if isinstance(entry, dict) else None
            try:
                counts[field] = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError:
                counts[field] = None
            if not isinstance(counts[field], list):
                hint = " (a schedule without pruning, as for CAFormer, is not a ViT's)" if raw == "None" else ""
                raise UserError(f"{where}: {field} must be a list of kept counts per block, got {raw!r}{hint}")
        try:
            routing = cls.diffrate(counts["prune_kept_num"], counts["merge_kept_num"])
        except UserError as err:
            raise UserError(f"{where}: {err}") from err
        return cls(routing.rules, name=f"diffrate-{model_key}-{budgets[budget]}", prop_attn=True)

    @classmethod
    def pitome(cls: type[R], ratio: float, depth: int) -> R:
        """PiToMe: every block keeps ``ratio`` of the tokens reaching it, merging the high-energy ones.

        As PiToMe's code does (see :mod:`attnprune.reduction.pitome`, which follows the code where the paper differs):
        the energy margin falls from 0.75 in block 0 as ``0.75 - 0.75 * layer / depth``; the first
        ``ceil(depth / 2)`` blocks match by bipartite soft matching over all tokens in energy order
        (``energy_bipartite``), the others merge only the ``2 r`` highest-energy tokens and protect the rest
        (``energy_merge``); merging averages by size, and attention is not proportional.

        Token counts: each rule keeps ``ratio`` of the ``n`` patch tokens reaching its block, ``ceil(ratio * n)``
        (with the rules' 1e-9 tolerance for float noise), where PiToMe's code removes ``floor(n - n * ratio)``. The
        two agree except where ``n * ratio`` is an integer in exact arithmetic but its float product lands just
        above it: at 25 tokens and ratio 0.56 (25 * 0.56 = 14.000000000000002) the rule keeps 14, the code 15.
        Below ratio 0.5 a block removes more tokens than matching can (half of them; ``energy_bipartite`` one more
        of an odd count), where the official code fails: the routing is refused when it is resolved, never clipped.

        Args:
            ratio: PiToMe's ``model.ratio``, in (0, 1]: the fraction of the patch tokens each block keeps.
            depth: the model's number of blocks.

        Raises:
            UserError: ``ratio`` is not a number in (0, 1], or ``depth`` not an integer >= 1.

        Example:
            >>> from attnprune import Routing
            >>> [(rule.reduce, rule.margin) for rule in Routing.pitome(0.9, 3).rules]
            [('energy_bipartite', 0.75), ('energy_bipartite', 0.5), ('energy_merge', 0.25)]
            >>> Routing.pitome(0.9, 3).token_counts(depth=3, num_tokens=64)
            [64, 58, 53, 48]
        """
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise UserError(f"PiToMe's ratio must be a fraction in (0, 1] (tokens kept per block), got {ratio!r}")
        if not is_int(depth) or depth < 1:
            raise UserError(f"PiToMe's depth must be the model's number of blocks (an integer >= 1), got {depth!r}")
        if ratio == 1:
            return cls((), name="pitome-1", prop_attn=False)
        bipartite = math.ceil(depth * 0.5)
        rules = tuple(
            Rule(
                layer=layer,
                keep=float(ratio),
                reduce="energy_bipartite" if layer < bipartite else "energy_merge",
                margin=0.75 - 0.75 * (layer / depth),
            )
            for layer in range(depth)
        )
        return cls(rules, name=f"pitome-{ratio:g}", prop_attn=False)

    @classmethod
    def mctf(cls: type[R], r: int, layers: Sequence[int], num_tokens: int | None = None) -> R:
        """MCTF: at each of ``layers``, merge ``r`` tokens before the block's attention by MCTF's multi-criteria
        two-way matching, with its one-step-ahead attention (reducer ``mctf``, see :mod:`attnprune.reduction.mctf`).

        The other settings are the official code's off-the-shelf DeiT-S ones (``--mctf_type
        [16,0,0,1,1,1,20,40,1,1,0]``): criteria temperatures 1, 20 and 40 (similarity, informativeness, size),
        two-way matching, pooling weighted by attention and size, proportional attention on. The one-step-ahead
        attention is the block's own attention on the tokens it receives, merged along with them: computed in the
        same forward pass, no training needed.

        Args:
            r: tokens merged at each of ``layers`` (MCTF's ``--r_evals``; 16 for DeiT-S).
            layers: the 0-based blocks that merge (MCTF's ``--activate_layer``; off the shelf every block but the
                first, ``range(1, 12)`` for DeiT-S).
            num_tokens: the model's non-prefix tokens; when given, each layer's r is capped as MCTF's code caps it
                for a model with one class token: at most half of the patch tokens left there, and at least 10
                tokens (the class token among them) left after merging; a layer capped to 0 gets no rule. Without
                it an r too large for the tokens left fails when the routing is applied.

        Raises:
            UserError: ``r`` or ``num_tokens`` is not an integer >= 0 (>= 1); a bad layer names its rule and field.

        Example:
            >>> from attnprune import Routing
            >>> Routing.mctf(16, range(1, 12)).rules[0]
            Rule(layer=1, r=16, reduce='mctf')
            >>> [rule.r for rule in Routing.mctf(20, (1, 2, 3), num_tokens=49).rules]  # 49 -> 29 -> 15 -> 9
            [20, 14, 6]
        """
        if not is_int(r) or r < 0:
            raise UserError(f"MCTF's r must be an integer >= 0 (tokens merged per layer), got r={r!r}")
        layers = _pruning_layers("MCTF", layers)
        schedule = _capped_schedule("MCTF", r, layers, num_tokens, lambda n: max(0, min(r, max_merge(n), n + 1 - 10)))
        rules = tuple(Rule(layer=layer, r=schedule[layer], reduce="mctf") for layer in layers if schedule[layer] > 0)
        return cls(rules, name=f"mctf-r{r}", prop_attn=True)


def _pruning_layers(method: str, layers: Sequence[int]) -> list[int]:
    """``layers`` as a list, refused when empty (a routing that prunes nothing under a method's name)."""
    layers = list(layers)
    if not layers:
        raise UserError(f"{method}'s layers must name at least one block, got []")
    return layers


def _capped_schedule(
    method: str, r: int, layers: list[int], num_tokens: int | None, cap: Callable[[int], int]
) -> dict[int, int]:
    """``r`` at each of ``layers``; with ``num_tokens``, each layer's ``cap(n)`` of the ``n`` patch tokens reaching
    it, in layer order (as PPT's and MCTF's code cap r)."""
    schedule = {layer: r for layer in layers}
    if num_tokens is not None:
        if not is_int(num_tokens) or num_tokens < 1:
            raise UserError(f"{method}'s num_tokens must be an integer >= 1, got num_tokens={num_tokens!r}")
        n = num_tokens
        for layer in sorted(layer for layer in schedule if is_int(layer)):  # rules name a bad layer
            schedule[layer] = cap(n)
            n -= schedule[layer]
    return schedule


def baseline_layers(depth: int) -> tuple[int, ...]:
    """EViT's three pruning layers (3, 6 and 9 of 12 blocks) scaled to ``depth`` blocks (fewer on shallow models,
    never beyond the last block).

    Example:
        >>> baseline_layers(12), baseline_layers(4)
        ((3, 6, 9), (1, 2, 3))
    """
    return tuple(sorted({min(depth - 1, max(1, round(depth * f))) for f in (0.25, 0.5, 0.75)}))
