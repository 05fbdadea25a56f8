"""``search_routing``: the static routing that best preserves the model under a FLOPs budget, checked on held-out
images against the baselines. A search is four steps: :func:`validate_search` (every setting, before any work),
:func:`run_search` (the strategy over the resumable state), :func:`~attnprune.search.check.check_held_out` and
:func:`search_report`; data-parallel under ``torch.distributed`` (:mod:`~attnprune.search.distributed`)."""

from __future__ import annotations

import numbers
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
from attnprune.search.beam import beam
from attnprune.search.check import check_confidence, check_held_out, split_holdout
from attnprune.search.diffrate import check_rate_search, diffrate
from attnprune.search.distributed import on_first_rank, share
from attnprune.search.evaluator import Evaluator
from attnprune.search.label_free import label_free
from attnprune.search.objective import resolve_objective
from attnprune.search.space import InfeasibleBudget, SearchSpace, cheapest_flops
from attnprune.search.state import SearchState, fingerprint
from attnprune.search.strategy import BeamOptions, RateOptions, SearchContext, Strategy
from attnprune.search.transition import transition
from attnprune.vit import check_prunable

__all__ = ["STRATEGIES", "SearchResult", "SearchSettings", "search_routing", "validate_search", "run_search"]

STRATEGIES: dict[str, Strategy] = {
    "beam": beam,
    "transition": transition,
    "label_free": label_free,
    "diffrate": diffrate,
}


@dataclass
class SearchResult:
    """The routing returned and how it was found (see :func:`search_routing` for the report's fields)."""

    routing: Routing
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchSettings:
    """A search's validated settings (:func:`validate_search`).

    Attributes:
        budget: the FLOPs budget as a fraction of ``unpruned``.
        space: the candidate rules.
        strategy: a key of :data:`STRATEGIES`.
        confidence: of the held-out check's paired test.
        options: the beam's settings.
        unpruned: the unpruned model's FLOPs.
        rates: the rate search's settings (``diffrate``).
    """

    budget: float
    space: SearchSpace
    strategy: str
    confidence: float
    options: BeamOptions
    unpruned: int
    rates: RateOptions = RateOptions()

    @property
    def target(self) -> float:
        """The FLOPs budget, absolute."""
        return self.budget * self.unpruned

    def identity(self, objective: str) -> dict[str, Any]:
        """What a saved state must have been searched with to be resumed (with the model and the images)."""
        identity = {
            "budget": self.budget,
            "space": asdict(self.space),
            "strategy": self.strategy,
            "objective": objective,
            "beam_width": self.options.beam_width,
            "screen_images": self.options.screen_images,
            "finalists": self.options.finalists,
        }
        return {**identity, "rates": asdict(self.rates)} if self.strategy == "diffrate" else identity


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise UserError(f"search {name} must be a positive integer, got {value!r}")


def validate_search(
    model: VisionTransformer,
    budget: float,
    *,
    space: SearchSpace | None,
    strategy: str,
    confidence: float,
    options: BeamOptions,
    rates: RateOptions | None = None,
) -> SearchSettings:
    """Check every setting of a search before any work.

    Raises:
        UserError: a setting out of range, or a model the routings cannot prune (``diffrate``: one without a class
            token).
        InfeasibleBudget: no routing of the space (``diffrate``: no DiffRate schedule) meets the budget (the message
            gives the cheapest reachable).
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown search strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise UserError(f"search budget must be a fraction of the unpruned model's FLOPs in (0, 1], got {budget!r}")
    check_confidence(confidence)
    for name in ("beam_width", "screen_images", "finalists"):
        _positive_int(name, getattr(options, name))
    check_prunable(model, Routing())
    space, rates = space or SearchSpace(), rates or RateOptions()
    settings = SearchSettings(budget, space, strategy, confidence, options, count_flops(model, Routing()), rates)
    cheapest = check_rate_search(model, rates) if strategy == "diffrate" else cheapest_flops(model, space)
    if cheapest > settings.target:
        raise InfeasibleBudget(
            f"budget {budget:g} ({settings.target / 1e9:.4g} GFLOPs) is below the cheapest routing the search space "
            f"reaches: {cheapest / 1e9:.4g} GFLOPs ({cheapest / settings.unpruned:.1%} of the unpruned model)"
        )
    return settings


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


def _evaluators(
    model: VisionTransformer, dataloader: Iterable, settings: SearchSettings, objective: str, holdout: float
) -> tuple[Evaluator, Evaluator | None, tuple[str, dict[str, Any]]]:
    """The evaluators of the searched and of the held-out images (None without a holdout), each on this rank's share
    of them on the model's device, and the search's fingerprint (:func:`~attnprune.search.state.fingerprint`), taken
    on all the searched images, as every rank reads them all."""
    searched, held_out = split_holdout(_batches(dataloader, model), holdout)
    name = resolve_objective(objective, model, all(labels is not None for _, labels in searched))
    key = fingerprint(model, settings.identity(name), searched)
    device = next(model.parameters()).device
    local, shard = share(searched, "searched", 0, device)
    evaluator, checker = Evaluator(model, local, name, shard), None
    if held_out:
        local, shard = share(held_out, "held-out", evaluator.images, device)
        checker = Evaluator(model, local, name, shard)
    return evaluator, checker, key


def run_search(
    model: VisionTransformer,
    evaluator: Evaluator,
    settings: SearchSettings,
    key: tuple[str, dict[str, Any]],
    state_path: str | Path | None,
    progress: bool,
) -> tuple[SearchState, float]:
    """Run (or resume from ``state_path``) the settings' strategy on the searched images of ``evaluator``.

    In a data-parallel search every rank runs it on its share of the images; rank 0 alone reads and writes the state
    and shows the progress bar.

    Args:
        key: the search's fingerprint and its parts (:func:`~attnprune.search.state.fingerprint`).

    Returns:
        The finished state and the seconds spent before this run, when it resumed an interrupted search (the
        evaluator's counts are the work done since the last checkpoint).

    Raises:
        UserError: a saved state of another search.
    """
    path = Path(state_path) if state_path is not None else None
    state = on_first_rank(lambda: SearchState.load(path, *key)) or SearchState(key[0])
    state.identity = key[1]
    previous_seconds = state.seconds
    first = evaluator.shard.rank == 0
    context = SearchContext(
        model,
        evaluator,
        settings.space,
        settings.target,
        path if first else None,
        progress and first,
        settings.options,
        settings.rates,
    )
    STRATEGIES[settings.strategy](context, state)
    return state, previous_seconds


def search_report(
    model: VisionTransformer,
    settings: SearchSettings,
    state: SearchState,
    evaluator: Evaluator,
    *,
    routing: Routing,
    metrics: dict[str, float],
    check: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """The report of :func:`search_routing` on the ``routing`` returned and its ``metrics`` on the searched images."""
    flops = count_flops(model, routing)
    block_passes = state.block_passes + evaluator.block_passes
    report = {
        "strategy": settings.strategy,
        "objective": evaluator.objective,
        "budget": settings.budget,
        **{f"val_{key}": value for key, value in metrics.items()},
        "flops": flops,
        "flops_ratio": flops / settings.unpruned,
        "candidates_evaluated": state.candidates + evaluator.candidates,
        "block_passes": block_passes,
        "full_forward_equivalents": block_passes / len(model.blocks),
        "images": evaluator.images,
        "images_seen": block_passes / len(model.blocks) * evaluator.images,
        "forward_backward_passes": state.forward_backward_passes,
        "wall_time_s": seconds,
        "world_size": evaluator.shard.size,
    }
    if state.before_fill is not None:
        report["before_fill"] = {
            **{f"val_{key}": value for key, value in state.before_fill.metrics.items()},
            "flops_ratio": state.before_fill.flops / settings.unpruned,
        }
    if state.transition_depth is not None:
        report["transition_depth"] = state.transition_depth
    report.update((state.extra or {}).get("report", {}))
    if check is not None:
        report["check"] = check
    return report


def search_routing(
    model: VisionTransformer,
    dataloader: Iterable,
    budget: float,
    *,
    space: SearchSpace | None = None,
    strategy: str = "beam",
    objective: str = "fidelity",
    holdout: float = 0.3,
    confidence: float = 0.5,
    state_path: str | Path | None = None,
    beam_width: int = 2,
    prefix_cache: bool = True,
    screen_images: int = 256,
    finalists: int = 4,
    progress: bool = True,
    rates: RateOptions | None = None,
) -> SearchResult:
    """Find the static routing within a FLOPs budget that best preserves what the model computes (data-parallel
    under ``torch.distributed``, every rank calling it alike: :mod:`~attnprune.search.distributed`).

    Args:
        model: a timm ViT in eval mode (its own routing, if any, is ignored).
        dataloader: validation batches, ``(images, labels)`` or bare images, preprocessed for the model (never the
            test split). Labels are needed only by ``objective="top1"``; when present, top-1 is reported too.
        budget: FLOPs budget as a fraction in (0, 1] of the unpruned model's.
        space: candidate rules (default :class:`SearchSpace`).
        strategy: ``beam``, ``transition``, ``label_free`` or ``diffrate`` (DiffRate's differentiable rate search,
            :mod:`~attnprune.search.diffrate`) (:data:`STRATEGIES`).
        objective: what ranks candidates (lower is better): ``fidelity`` (default: ``kl``, the KL divergence of the
            class distribution from the unpruned model's on the same image, or ``cosine`` distance of the features
            for a headless model), ``kl``, ``cosine`` (of the pooled features the head reads, also on a model with
            a head) or ``top1`` (error against the labels).
        holdout: fraction of the validation images (the last ones) kept out of the search. The routing found is
            compared there with the baselines within budget (ToMe, EViT, attention top-k, PiToMe, PPT) by the same
            objective: searching hundreds of candidates on the same images rewards lucky ones. 0 searches on every
            image and checks nothing.
        confidence: the routing found is returned only if a one-sided paired test of the per-image held-out losses
            says it beats every baseline with this confidence, else the best baseline there (0.5: the lowest mean).
        state_path: JSON file saving the search as it goes; rerunning with it continues where it stopped.
        beam_width: partial routings kept per layer (``beam``).
        prefix_cache: reuse the token states of each fixed prefix (``beam``); off, every candidate runs from the
            input (for measuring what the cache saves: the result is the same).
        screen_images: ``beam`` first scores every candidate on the batches holding this many images,
        finalists: then confirms the ``finalists`` best of them (at least ``beam_width``) on all searched images;
            only those confirmations rank the beam and the result.
        progress: show a progress bar.
        rates: the settings of ``diffrate`` (default :class:`~attnprune.search.strategy.RateOptions`: DiffRate's
            published learning rates, granularity and FLOPs weight).

    Returns:
        The routing and a report: ``objective``, ``val_loss`` and the output change (``val_kl`` or ``val_cosine``:
        the objective's, or under ``top1`` the model's own) and, with labels, ``val_top1`` on the searched images;
        FLOPs and their ratio; candidates evaluated; block passes; images; images seen (image forward passes,
        counting repeats) and batches run forward and backward (``diffrate``'s steps, with its learned schedule); wall
        time; ``world_size``; and with ``holdout`` the ``check``: every contender's metrics on the held-out images,
        which was ``returned`` and the routing the search found (``searched_routing``), returned or not.

    Raises:
        InfeasibleBudget: no routing of the space meets the budget (the message gives the cheapest reachable).
        UserError: a setting out of range, labels outside the head's classes, a state of another search (named),
            fewer images than ranks (one rank's error is raised on every rank: ``AllRanksError``).
    """
    options = BeamOptions(beam_width, prefix_cache, screen_images, finalists)
    settings = validate_search(
        model, budget, space=space, strategy=strategy, confidence=confidence, options=options, rates=rates
    )
    start = time.perf_counter()
    evaluator, checker, key = _evaluators(model, dataloader, settings, objective, holdout)
    state, previous_seconds = run_search(model, evaluator, settings, key, state_path, progress)
    routing, metrics, check = state.best.routing, state.best.metrics, None
    if checker is not None:
        routing, metrics, check = check_held_out(
            model, evaluator, checker, routing, metrics, settings.target, confidence
        )
    seconds = previous_seconds + time.perf_counter() - start
    report = search_report(
        model, settings, state, evaluator, routing=routing, metrics=metrics, check=check, seconds=seconds
    )
    return SearchResult(routing, report)
