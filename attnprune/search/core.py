"""``search_routing``: the static routing that best preserves the model under a FLOPs budget, checked on held-out
images against the baselines."""

from __future__ import annotations

import math
import numbers
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from attnprune.errors import UserError, UserTypeError
from attnprune.flops import count_flops
from attnprune.routing import Routing
from attnprune.routing.baselines import matched_baselines
from attnprune.search.beam import beam
from attnprune.search.evaluator import Evaluator
from attnprune.search.label_free import label_free
from attnprune.search.objective import resolve_objective
from attnprune.search.space import InfeasibleBudget, SearchSpace, cheapest_flops
from attnprune.search.state import SearchState, fingerprint
from attnprune.search.strategy import BeamOptions, SearchContext, Strategy
from attnprune.search.transition import transition
from attnprune.vit import check_prunable

__all__ = ["SearchResult", "search_routing", "split_holdout", "check_against_baselines", "standard_error"]

STRATEGIES: dict[str, Strategy] = {"beam": beam, "transition": transition, "label_free": label_free}


@dataclass
class SearchResult:
    """The routing returned and how it was found (see :func:`search_routing` for the report's fields)."""

    routing: Routing
    report: dict[str, Any] = field(default_factory=dict)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise UserError(f"search {name} must be a positive integer, got {value!r}")


def _check_confidence(confidence: Any) -> None:
    if not isinstance(confidence, numbers.Real) or isinstance(confidence, bool) or not 0.5 <= confidence < 1:
        raise UserError(f"search confidence must be in [0.5, 1), got {confidence!r}")


def _batches(dataloader: Iterable, model: VisionTransformer) -> list[tuple[Tensor, Tensor | None]]:
    """``(images, labels)`` pairs from a loader of such pairs or of bare image tensors, labels checked."""
    batches = []
    for batch in dataloader:
        images, labels = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        if not isinstance(images, Tensor) or images.ndim != 4:
            got = type(images).__name__ if not isinstance(images, Tensor) else f"a tensor of shape {list(images.shape)}"
            raise UserTypeError(
                f"search dataloader must yield image tensors [B, C, H, W] or (images, labels), got {got}"
            )
        if labels is not None and model.num_classes > 0 and len(labels):
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= model.num_classes:
                bad = low if low < 0 else high
                raise UserError(f"search dataloader label {bad} is outside the model's {model.num_classes} classes")
        batches.append((images, labels))
    if not batches or not sum(len(images) for images, _ in batches):
        raise UserError("search dataloader yielded no images")
    return batches


def search_routing(
    model: VisionTransformer,
    dataloader: Iterable,
    budget: float,
    *,
    space: SearchSpace | None = None,
    strategy: str = "beam",
    objective: str = "fidelity",
    holdout: float = 0.3,
    confidence: float = 0.95,
    state_path: str | Path | None = None,
    beam_width: int = 2,
    prefix_cache: bool = True,
    screen_images: int = 256,
    finalists: int = 4,
    progress: bool = True,
) -> SearchResult:
    """Find the static routing within a FLOPs budget that best preserves what the model computes.

    Args:
        model: a timm ViT in eval mode (its own routing, if any, is ignored).
        dataloader: validation batches, ``(images, labels)`` or bare images, preprocessed for the model (never the
            test split). Labels are needed only by ``objective="top1"``; when present, top-1 is reported too.
        budget: FLOPs budget as a fraction in (0, 1] of the unpruned model's.
        space: candidate rules (default :class:`SearchSpace`).
        strategy: ``beam``, ``transition`` or ``label_free`` (:data:`STRATEGIES`).
        objective: what ranks candidates (lower is better): ``fidelity`` (default: ``kl``, the KL divergence of the
            class distribution from the unpruned model's on the same image, or ``cosine`` distance of the features
            for a headless model), ``kl``, ``cosine`` or ``top1`` (error against the labels).
        holdout: fraction of the validation images (the last ones) kept out of the search. The routing found is
            compared there with the baselines within budget (ToMe, EViT, attention top-k) by the same objective:
            searching hundreds of candidates on the same images rewards lucky ones. 0 searches on every image and
            checks nothing.
        confidence: the routing found is returned only if a one-sided paired test of the per-image held-out losses
            says it beats every baseline with this confidence; otherwise the best baseline there is returned.
        state_path: JSON file saving the search as it goes; rerunning with it continues where it stopped.
        beam_width: partial routings kept per layer (``beam``).
        prefix_cache: reuse the token states of each fixed prefix (``beam``); off, every candidate runs from the
            input (for measuring what the cache saves: the result is the same).
        screen_images: ``beam`` first scores every candidate on the batches holding this many images,
        finalists: then confirms the ``finalists`` best of them (at least ``beam_width``) on all searched images;
            only those confirmations rank the beam and the result.
        progress: show a progress bar.

    Returns:
        The routing and a report: ``objective``, ``val_loss`` and the fidelity metric (``val_kl`` or ``val_cosine``)
        and, with labels, ``val_top1`` on the searched images; FLOPs and their ratio; candidates evaluated; block
        passes; images; wall time; and with ``holdout`` the ``check``: every contender's metrics on the held-out
        images, which was ``returned`` and the routing the search found (``searched_routing``), returned or not.

    Raises:
        InfeasibleBudget: no routing of the space meets the budget (the message gives the cheapest reachable).
        ValueError: a setting out of range, labels outside the head's classes, a state of another search.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown search strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise UserError(f"search budget must be a fraction of the unpruned model's FLOPs in (0, 1], got {budget!r}")
    _check_confidence(confidence)
    for name, value in (("beam_width", beam_width), ("screen_images", screen_images), ("finalists", finalists)):
        _positive_int(name, value)
    space = space or SearchSpace()
    check_prunable(model, Routing())
    unpruned = count_flops(model, Routing())
    target = budget * unpruned
    cheapest = cheapest_flops(model, space)
    if cheapest > target:
        raise InfeasibleBudget(
            f"budget {budget:g} ({target / 1e9:.4g} GFLOPs) is below the cheapest routing the search space reaches: "
            f"{cheapest / 1e9:.4g} GFLOPs ({cheapest / unpruned:.1%} of the unpruned model)"
        )
    start = time.perf_counter()
    searched, held_out = split_holdout(_batches(dataloader, model), holdout)
    name = resolve_objective(objective, model, all(labels is not None for _, labels in searched))
    evaluator = Evaluator(model, searched, name)
    path = Path(state_path) if state_path is not None else None
    settings = {
        "budget": budget,
        "space": asdict(space),
        "strategy": strategy,
        "objective": name,
        "beam_width": beam_width,
        "screen_images": screen_images,
        "finalists": finalists,
    }
    key = fingerprint(model, settings, evaluator)
    state = SearchState.load(path, key) or SearchState(key)
    previous_seconds = state.seconds  # time spent before an interruption, when resuming
    options = BeamOptions(beam_width, prefix_cache, screen_images, finalists)
    STRATEGIES[strategy](SearchContext(model, evaluator, space, target, path, progress, options), state)
    routing, metrics = state.best.routing, state.best.metrics
    check = None
    if held_out:
        checker = Evaluator(model, held_out, name)
        routing, check = check_against_baselines(model, checker, routing, target, confidence)
        if check["returned"] != "searched":  # the returned baseline's metrics on the searched images
            metrics = evaluator.measure(evaluator.initial(), routing, 0)
        evaluator.candidates += checker.candidates
        evaluator.block_passes += checker.block_passes * checker.images / evaluator.images
    flops = count_flops(model, routing)
    block_passes = state.block_passes + evaluator.block_passes
    report = {
        "strategy": strategy,
        "objective": name,
        "budget": budget,
        **{f"val_{key}": value for key, value in metrics.items()},
        "flops": flops,
        "flops_ratio": flops / unpruned,
        "candidates_evaluated": state.candidates + evaluator.candidates,
        "block_passes": block_passes,
        "full_forward_equivalents": block_passes / len(model.blocks),
        "images": evaluator.images,
        "wall_time_s": previous_seconds + time.perf_counter() - start,
    }
    if state.before_fill is not None:
        report["before_fill"] = {
            **{f"val_{key}": value for key, value in state.before_fill.metrics.items()},
            "flops_ratio": state.before_fill.flops / unpruned,
        }
    if state.transition_depth is not None:
        report["transition_depth"] = state.transition_depth
    if check is not None:
        report["check"] = check
    return SearchResult(routing, report)


def split_holdout(batches: list, holdout: float) -> tuple[list, list]:
    """The validation images searched on and the last ``holdout`` fraction of them kept out to check the result,
    as batches (a batch straddling the boundary is split)."""
    if not isinstance(holdout, numbers.Real) or isinstance(holdout, bool) or not 0 <= holdout < 1:
        raise UserError(f"holdout must be a fraction of the validation images in [0, 1), got {holdout!r}")
    total = sum(len(images) for images, _ in batches)
    count = round(holdout * total)
    if holdout > 0 and not 0 < count < total:
        raise UserError(
            f"holdout {holdout:g} of {total} validation images leaves {total - count} to search on and {count} to "
            "check on; it must leave at least one image for each"
        )
    searched, held_out, seen = [], [], 0
    for images, labels in batches:
        cut = min(max(total - count - seen, 0), len(images))
        seen += len(images)
        if cut:
            searched.append((images[:cut], labels[:cut] if labels is not None else None))
        if cut < len(images):
            held_out.append((images[cut:], labels[cut:] if labels is not None else None))
    return searched, held_out


def check_against_baselines(
    model: VisionTransformer, held_out: Evaluator, routing: Routing, target: float, confidence: float = 0.95
) -> tuple[Routing, dict[str, Any]]:
    """The routing found against the baselines within budget (ToMe, and EViT and attention top-k where the model has
    a class token), measured on the held-out images by the search's objective.

    The routing found is returned only when it beats every baseline with ``confidence`` by a one-sided paired test of
    the per-image losses (the upper confidence bound of its mean loss minus the baseline's is below 0); otherwise
    the baseline with the lowest held-out loss is. A routing picked among hundreds of candidates looks better on the
    images it was picked on than it is, and a difference within the noise of a few hundred images is no lead.
    """
    _check_confidence(confidence)
    contenders = {"searched": routing, **matched_baselines(model, target, within=True)}
    contenders.pop("random", None)  # a control, not a contender (and absent when even it cannot meet the target)
    values = {method: held_out.per_image(held_out.initial(), r, 0) for method, r in contenders.items()}
    results = {method: {name: v.mean().item() for name, v in metrics.items()} for method, metrics in values.items()}
    z = statistics.NormalDist().inv_cdf(confidence)
    paired = {}
    for method in [m for m in contenders if m != "searched"]:
        difference = values["searched"]["loss"] - values[method]["loss"]
        mean, error = difference.mean().item(), standard_error(difference)
        paired[method] = {"difference": mean, "standard_error": error, "upper_bound": mean + z * error}
    method = "searched"  # also when no baseline gets within the budget
    if not all(p["upper_bound"] < 0 for p in paired.values()):
        method = min(paired, key=lambda m: results[m]["loss"])
    check = {
        "holdout_images": held_out.images,
        "objective": held_out.objective,
        "confidence": confidence,
        "holdout": results,
        "paired": paired,
        "returned": method,
        "searched_routing": routing.to_dict(),
    }
    if method != "searched":
        bound = paired[method]["upper_bound"]
        check["note"] = (
            f"the routing the search found did not beat the baseline {method} on the {held_out.images} held-out "
            f"images with {confidence:.0%} confidence ({held_out.objective} {results['searched']['loss']:.4g} "
            f"against {results[method]['loss']:.4g}, upper bound of the difference {bound:+.3g}), so {method} is "
            "returned; the routing found is in searched_routing"
        )
    return contenders[method], check


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of ``values`` (per-image differences for a paired comparison); infinite for one
    value, which says nothing of the spread (so a routing cannot be confirmed on one image)."""
    return values.std().item() / math.sqrt(len(values)) if len(values) > 1 else math.inf
