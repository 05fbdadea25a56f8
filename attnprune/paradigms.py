"""Training paradigms and how each reads out its prediction.

| paradigm | readout |
| --- | --- |
| ``supervised`` | the class token (``cls``) |
| ``distilled`` | class and distillation heads averaged at eval (``cls+dist``, DeiT) |
| ``dino`` | a linear probe or k-NN on frozen class-token features (``probe``) |
| ``mae`` | the average of the patch tokens (``avg``, with ``fc_norm``) |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnprune.errors import UserError

__all__ = ["Paradigm", "PARADIGMS", "get_paradigm", "knn_predict"]


@dataclass(frozen=True)
class Paradigm:
    """How a training paradigm reads out its prediction.

    Attributes:
        name: registry key.
        readout: ``cls`` (class token), ``cls+dist`` (class and distillation heads averaged at eval), ``probe``
            (a linear probe or k-NN on frozen class-token features), ``avg`` (average of the patch tokens).
        model_kwargs: timm ``create_model`` arguments the readout needs.
        hub_models: timm hub names of public models of this paradigm.
    """

    name: str
    readout: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_models: tuple[str, ...] = ()


PARADIGMS: dict[str, Paradigm] = {
    p.name: p
    for p in (
        Paradigm(
            "supervised",
            "cls",
            {},
            (
                "vit_small_patch16_224.augreg_in21k_ft_in1k",
                "vit_base_patch16_224.augreg_in21k_ft_in1k",
                "deit_small_patch16_224.fb_in1k",
                "deit_base_patch16_224.fb_in1k",
            ),
        ),
        Paradigm(
            "distilled",
            "cls+dist",
            {},
            ("deit_small_distilled_patch16_224.fb_in1k", "deit_base_distilled_patch16_224.fb_in1k"),
        ),
        Paradigm("dino", "probe", {"num_classes": 0}, ("vit_small_patch16_224.dino", "vit_base_patch16_224.dino")),
        Paradigm(
            "mae",
            "avg",
            {"global_pool": "avg", "fc_norm": True},
            ("vit_base_patch16_224.mae", "vit_large_patch16_224.mae"),
        ),
    )
}


def get_paradigm(name: str) -> Paradigm:
    """The paradigm called ``name``; a ``ValueError`` listing the known ones otherwise."""
    if name not in PARADIGMS:
        raise UserError(f"unknown paradigm {name!r} (known: {', '.join(PARADIGMS)})")
    return PARADIGMS[name]


@torch.no_grad()
def knn_predict(
    features: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """Weighted k-NN class scores on L2-normalised features (DINO's evaluation).

    Each of the ``k`` nearest training features (cosine similarity s) votes for its label with weight exp(s / T).

    Args:
        features: ``[B, D]`` query features.
        bank: ``[M, D]`` training features.
        bank_labels: ``[M]`` their labels.
        num_classes: number of classes.
        k: neighbours.
        temperature: T of the vote weights.

    Returns:
        ``[B, num_classes]`` vote totals (argmax is the prediction).
    """
    features, bank = nn.functional.normalize(features, dim=-1), nn.functional.normalize(bank, dim=-1)
    similarity, index = (features @ bank.T).topk(min(k, bank.shape[0]), dim=-1)
    votes = torch.zeros(features.shape[0], num_classes, device=features.device, dtype=features.dtype)
    return votes.scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
