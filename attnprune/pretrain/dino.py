"""DINO's pieces in plain torch (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021): the projection head, the student/teacher network over a list of crops, the loss over pairs of views, the
centring of the teacher's outputs and the teacher's exponential moving average of the student.

Written from the paper's description, not from its repository.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["DINOHead", "DINONetwork", "dino_loss", "dino_teacher_targets", "ema_update", "update_center"]


class DINOHead(nn.Module):
    """DINO projection head: a 3-layer MLP with GELU, an L2-normalised bottleneck and a weight-normalised linear
    layer without bias to ``out_dim`` prototypes.

    The last layer's weight norm has its gain fixed at 1 (the paper's default), so it is written directly as a
    linear map with unit-norm rows.

    Args:
        in_dim: backbone feature width.
        out_dim: number of output dimensions (prototypes).
        hidden_dim: width of the MLP's hidden layers.
        bottleneck_dim: width of the normalised bottleneck.
    """

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 256, bottleneck_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_dim]`` features to ``[B, out_dim]`` logits (cosines between bottleneck and prototypes)."""
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=-1))


class DINONetwork(nn.Module):
    """A ViT backbone and a :class:`DINOHead` applied to a list of crops.

    Consecutive crops of the same resolution run through the backbone as one batch (global crops together, local
    crops together), so the backbone must accept several input sizes (timm's ``dynamic_img_size=True``).
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        """``V`` crops of ``[B, C, H_v, W_v]`` to ``[V * B, out_dim]`` logits, crop after crop."""
        features, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))


def dino_teacher_targets(teacher_out: Tensor, center: Tensor, temperature: float) -> Tensor:
    """Teacher probabilities: centred (against collapse to one dimension) and sharpened (against uniformity)."""
    return ((teacher_out - center) / temperature).softmax(dim=-1)


def dino_loss(student_out: Tensor, teacher_probs: Tensor, num_views: int, student_temp: float) -> Tensor:
    """Cross-entropy between teacher and student distributions over every pair of different views, averaged.

    Args:
        student_out: ``[V * B, K]`` student logits, view after view (the global views first).
        teacher_probs: ``[G * B, K]`` teacher probabilities for the first ``G`` (global) views.
        num_views: ``V``.
        student_temp: temperature of the student softmax.

    Returns:
        The scalar loss.
    """
    student_logp = (student_out / student_temp).log_softmax(dim=-1).chunk(num_views)
    batch = student_out.shape[0] // num_views
    total, pairs = student_out.new_zeros(()), 0
    for t, target in enumerate(teacher_probs.split(batch)):
        for s, logp in enumerate(student_logp):
            if s != t:
                total = total - (target * logp).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


def _mean_across_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> None:
    """In place: ``center <- momentum * center + (1 - momentum) * mean(teacher_out)`` (mean over all ranks)."""
    batch_center = _mean_across_ranks(teacher_out.mean(dim=0, keepdim=True))
    center.mul_(momentum).add_(batch_center, alpha=1.0 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, for every parameter: ``teacher <- momentum * teacher + (1 - momentum) * student``."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
