"""What the routing search minimises: how far the pruned model's output moves from the unpruned model's.

Every objective is a per-image loss, lower is better:

- ``kl``: KL divergence ``KL(p || q)`` of the pruned model's class distribution ``q`` from the unpruned model's ``p``
  on the same image. It needs no labels, and since it sees the whole distribution rather than one bit per image it
  ranks candidates far more consistently across image subsets than top-1 does.
- ``cosine``: ``1 - cos`` between the pruned and unpruned outputs: for headless backbones (``num_classes=0``, DINO's),
  whose output is the pooled feature.
- ``top1``: top-1 error against the labels.

``fidelity`` (the default) is ``kl`` for a model with a classifier and ``cosine`` for a headless one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attnprune.errors import UserError

__all__ = ["OBJECTIVES", "resolve_objective", "fidelity_metric", "kl_divergence", "cosine_distance", "top1_error"]

OBJECTIVES = ("fidelity", "kl", "cosine", "top1")


def kl_divergence(reference: Tensor, logits: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` per image, in nats: ``[B, C], [B, C] -> [B]``."""
    log_p, log_q = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def cosine_distance(reference: Tensor, features: Tensor) -> Tensor:
    """``1 - cos(reference, features)`` per image: ``[B, D], [B, D] -> [B]``."""
    return 1.0 - F.cosine_similarity(reference.float(), features.float(), dim=-1)


def top1_error(logits: Tensor, labels: Tensor) -> Tensor:
    """1 where the top class is not the label, else 0: ``[B, C], [B] -> [B]``."""
    return (logits.argmax(-1) != labels).float()


LOSSES = {"kl": kl_divergence, "cosine": cosine_distance}


def fidelity_metric(model: nn.Module) -> str:
    """``kl`` for a model with a classifier head, ``cosine`` for a headless backbone."""
    return "kl" if getattr(model, "num_classes", 0) > 0 else "cosine"


def resolve_objective(objective: str, model: nn.Module, has_labels: bool) -> str:
    """The concrete objective (``kl``, ``cosine`` or ``top1``) that ``objective`` names for ``model``.

    Raises:
        ValueError: an unknown objective, ``kl`` or ``top1`` on a headless model, or ``top1`` without labels.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    name = fidelity_metric(model) if objective == "fidelity" else objective
    if name in ("kl", "top1") and fidelity_metric(model) == "cosine":
        raise UserError(f"objective {objective!r} needs class logits, but the model is headless (num_classes=0)")
    if name == "top1" and not has_labels:
        raise UserError("objective 'top1' needs labels, but the validation batches have none")
    return name
