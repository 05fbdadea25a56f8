"""The transition depth: the block from which attention is the most reliable guide to which tokens matter.

One definition, used by the analysis (``analyze.py``'s message), the label-free search and claim (c): **the first
block from which the best attention scorer agrees with the leave-one-out oracle better than every non-attention
scorer (embedding statistics and similarity) at every later block**. A block where attention leads once and loses
the lead again deeper is not a transition: pruning by attention from there would trust it where it is not
reliable. Blocks where the oracle is constant (the last block of a class-token readout, where removing a patch token
changes nothing) are skipped. The first block where attention leads at all is reported beside it
(:func:`first_lead`), never in its place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnprune.scoring import SCORERS

__all__ = [
    "NON_ATTENTION",
    "attention_leads",
    "attention_transition_depth",
    "claim_scorers",
    "first_lead",
    "informative_layers",
    "transition_depth",
]

NON_ATTENTION = ("statistics", "similarity")
"""The scorer families attention is compared with (the ``random`` control is not one of them)."""


def claim_scorers(class_token: bool) -> list[str]:
    """The scorers compared: attention, statistics and similarity (not the random control)."""
    return sorted(
        name
        for name, s in SCORERS.items()
        if s.family in ("attention", *NON_ATTENTION) and (class_token or not s.needs_class_token)
    )


def informative_layers(model: nn.Module) -> list[bool]:
    """Blocks where removing a patch token can change the output: all but the last under a class-token readout."""
    depth = len(model.blocks)
    token_readout = getattr(model, "global_pool", "token") == "token"
    return [not (token_readout and layer == depth - 1) for layer in range(depth)]


def attention_leads(agreement: Tensor, attention: Tensor) -> Tensor:
    """``[..., S, L] -> [..., L]``: the best attention scorer agrees with the oracle strictly better than any other.

    Args:
        agreement: mean Spearman correlation of each scorer with the oracle, per block.
        attention: ``[S]`` bool, which scorers are attention scorers.
    """
    att = agreement.masked_fill(~attention[:, None], -math.inf).amax(-2)
    non = agreement.masked_fill(attention[:, None], -math.inf).amax(-2)
    return att > non


def transition_depth(agreement: Tensor, attention: Tensor, informative: Tensor) -> Tensor:
    """The transition depth (see the module docstring), vectorised over leading dimensions (bootstrap samples).

    Args:
        agreement: mean Spearman with the oracle ``[..., S, L]``.
        attention: ``[S]`` bool, which scorers are attention scorers.
        informative: ``[L]`` bool, blocks where the oracle can vary (the others are skipped).

    Returns:
        ``[...]`` long: the first informative block from which the best attention scorer leads at every later
        informative block; ``L`` (the depth) when there is none.

    Example:
        >>> agreement = torch.tensor([[0.1, 0.5, 0.2, 0.6], [0.3, 0.1, 0.4, 0.2]])  # attention, then l2_norm
        >>> transition_depth(agreement, torch.tensor([True, False]), torch.ones(4, dtype=torch.bool))
        tensor(3)
    """
    depth = agreement.shape[-1]
    leads = attention_leads(agreement, attention) & informative
    held = (leads | ~informative).flip(-1).cumprod(-1).flip(-1).bool()  # leads at every informative block from here on
    blocks = torch.arange(depth).expand_as(leads)
    return torch.where(held & leads, blocks, depth).amin(-1)


def first_lead(agreement: Tensor, attention: Tensor, informative: Tensor) -> Tensor:
    """The first informative block where the best attention scorer leads at all (``L`` when none), with the
    arguments of :func:`transition_depth`; it differs from the transition depth when the lead is lost again."""
    depth = agreement.shape[-1]
    leads = attention_leads(agreement, attention) & informative
    return torch.where(leads, torch.arange(depth).expand_as(leads), depth).amin(-1)


def attention_transition_depth(
    results: dict[str, list[float]], attention: str | None = None, informative: Sequence[bool] | None = None
) -> int | None:
    """The transition depth from a :class:`~attnprune.selectivity.SelectivityAnalyzer`'s results.

    Args:
        results: ``SelectivityAnalyzer.compute()``; its ``reliability_spearman_<scorer>`` entries are compared.
        attention: the attention scorer to judge (default: the best of every attention scorer in ``results``).
        informative: blocks where the oracle can vary (:func:`informative_layers` of the model); by default the
            blocks where some compared scorer's agreement is non-zero (a constant oracle gives 0 to every scorer).

    Returns:
        The block, or None when attention never takes over (or ``results`` hold no agreement to compare).
    """
    prefix = "reliability_spearman_"
    scorers = [k.removeprefix(prefix) for k in results if k.startswith(prefix)]
    scorers = [
        s
        for s in scorers
        if s in SCORERS
        and (SCORERS[s].family in NON_ATTENTION or (SCORERS[s].family == "attention" and attention in (None, s)))
    ]
    is_attention = torch.tensor([SCORERS[s].family == "attention" for s in scorers], dtype=torch.bool)
    if not is_attention.any() or is_attention.all():
        return None
    agreement = torch.tensor([results[prefix + s] for s in scorers], dtype=torch.float64).nan_to_num(-math.inf)
    if informative is None:
        informative = (agreement.isfinite() & (agreement != 0)).any(0)
    informative = torch.as_tensor(informative, dtype=torch.bool)
    depth = transition_depth(agreement, is_attention, informative)
    return None if int(depth) >= agreement.shape[-1] else int(depth)
