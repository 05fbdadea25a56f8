"""What every search strategy is given and how it is called: one signature, ``strategy(context, state)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from timm.models.vision_transformer import VisionTransformer

from attnprune.search.evaluator import Evaluator
from attnprune.search.space import SearchSpace
from attnprune.search.state import SearchState

__all__ = ["BeamOptions", "RateOptions", "SearchContext", "Strategy"]


@dataclass(frozen=True)
class BeamOptions:
    """The settings of the ``beam`` strategy (see :func:`attnprune.search.search_routing`).

    Attributes:
        beam_width: partial routings kept per layer.
        prefix_cache: reuse the token states of each fixed prefix; off, every candidate runs from the input.
        screen_images: every candidate is first scored on the batches holding this many images,
        finalists: then the ``finalists`` best of them (at least ``beam_width``) are confirmed on all searched images.
    """

    beam_width: int = 2
    prefix_cache: bool = True
    screen_images: int = 256
    finalists: int = 4


@dataclass(frozen=True)
class RateOptions:
    """The settings of the ``diffrate`` strategy, DiffRate's differentiable rate search (see
    :mod:`attnprune.search.diffrate`); the defaults of the learning rates, the granularity and the FLOPs weight are
    those of the official code (``main.py``, ``engine.py``).

    Attributes:
        steps: optimizer steps, each a forward and a backward pass over one batch of the searched images.
        batch_size: images per step (all searched images when fewer; in all, over every rank of a data-parallel
            search).
        granularity: gap between the candidate kept counts of a block (DiffRate's ``--granularity``).
        lr: learning rate of the rate logits at the first step (``--arch-lr``),
        min_lr: cosine-annealed to this at the last (``--arch-min-lr``).
        flops_weight: weight of the squared FLOPs penalty (``engine.py``'s ``lamb``).
        warmup_steps: steps without the FLOPs penalty at the start (``--warmup_compression_rate``: one epoch).
        seed: the order in which batches are drawn from the searched images.
    """

    steps: int = 1000
    batch_size: int = 64
    granularity: int = 4
    lr: float = 0.01
    min_lr: float = 0.001
    flops_weight: float = 5.0
    warmup_steps: int = 0
    seed: int = 0


@dataclass(frozen=True)
class SearchContext:
    """What a strategy searches with; the :class:`SearchState` it changes comes beside it.

    Attributes:
        model: the timm ViT searched.
        evaluator: scores routings on the searched images and counts the work done.
        space: the candidate rules.
        target: the FLOPs budget, absolute.
        path: where the state is saved after every step (None: not saved).
        progress: show a progress bar.
        options: the beam's settings (the other strategies ignore them).
        rates: the rate search's settings (``diffrate``; the other strategies ignore them).
    """

    model: VisionTransformer
    evaluator: Evaluator
    space: SearchSpace
    target: float
    path: Path | None = None
    progress: bool = False
    options: BeamOptions = BeamOptions()
    rates: RateOptions = RateOptions()


class Strategy(Protocol):
    """A search strategy: runs (or resumes) the search in ``state``, leaving the best routing in ``state.best`` and
    checkpointing the state after every step (:meth:`SearchState.checkpoint`)."""

    def __call__(self, context: SearchContext, state: SearchState) -> None: ...
