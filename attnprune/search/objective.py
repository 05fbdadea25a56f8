"""What the routing search minimises: how far the pruned model's output moves from the unpruned model's.

Every objective is a per-image loss, lower is better:

- ``kl``: KL divergence ``KL(p || q)`` of the pruned model's class distribution ``q`` from the unpruned model's ``p``
  on the same image. It needs no labels, and since it sees the whole distribution rather than one bit per image it
  ranks candidates far more consistently across image subsets than top-1 does.
- ``cosine``: ``1 - cos`` between the pruned and unpruned pooled features (what the classifier reads; all a headless
  backbone, ``num_classes=0`` as DINO's, outputs), on a model with a head as on a headless one.
- ``top1``: top-1 error against the labels.

``fidelity`` (the default) is ``kl`` for a model with a classifier and ``cosine`` for a headless one.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnprune.errors import UserError
from attnprune.fidelity import cosine_distance, fidelity_metric, kl_divergence

__all__ = ["OBJECTIVES", "resolve_objective", "fidelity_metric", "kl_divergence", "cosine_distance", "top1_error"]

OBJECTIVES = ("fidelity", "kl", "cosine", "top1")


def top1_error(logits: Tensor, labels: Tensor) -> Tensor:
    """1 where the top class is not the label, else 0: ``[B, C], [B] -> [B]``."""
    return (logits.argmax(-1) != labels).float()


def resolve_objective(objective: str, model: nn.Module, has_labels: bool) -> str:
    """The concrete objective (``kl``, ``cosine`` or ``top1``) that ``objective`` names for ``model``.

    Raises:
        UserError: an unknown objective, ``kl`` or ``top1`` on a headless model, or ``top1`` without labels.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    name = fidelity_metric(model) if objective == "fidelity" else objective
    if name in ("kl", "top1") and fidelity_metric(model) == "cosine":
        raise UserError(f"objective {objective!r} needs class logits, but the model is headless (num_classes=0)")
    if name == "top1" and not has_labels:
        raise UserError("objective 'top1' needs labels, but the validation batches have none")
    return name
