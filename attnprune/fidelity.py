"""How far a pruned model's output moves from the unpruned model's on the same image: the one measure of "output
change" behind both the search's objective and the selectivity oracle.

- ``kl``: ``KL(p || q)`` of the pruned model's class distribution ``q`` from the unpruned model's ``p``, for a model
  with a classifier head;
- ``cosine``: ``1 - cos`` between the pruned and unpruned outputs, for a headless backbone (``num_classes=0``,
  DINO's) whose output is its pooled feature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FIDELITY", "cosine_distance", "fidelity_metric", "kl_divergence", "output_change"]


def kl_divergence(reference: Tensor, logits: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` per image, in nats: ``[B, C], [B, C] -> [B]``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> kl_divergence(logits, logits)
        tensor([0., 0.])
    """
    log_p, log_q = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def cosine_distance(reference: Tensor, features: Tensor) -> Tensor:
    """``1 - cos(reference, features)`` per image: ``[B, D], [B, D] -> [B]``."""
    return 1.0 - F.cosine_similarity(reference.float(), features.float(), dim=-1)


FIDELITY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"kl": kl_divergence, "cosine": cosine_distance}
"""The output-change measures by name: ``measure(reference, output) -> [B]``."""


def fidelity_metric(model: nn.Module) -> str:
    """``kl`` for a model with a classifier head, ``cosine`` for a headless backbone."""
    return "kl" if getattr(model, "num_classes", 0) > 0 else "cosine"


def output_change(model: nn.Module, reference: Tensor, output: Tensor) -> Tensor:
    """Per image, how far ``output`` is from the unpruned ``reference`` by ``model``'s :func:`fidelity_metric`."""
    return FIDELITY[fidelity_metric(model)](reference, output)
