"""Multi-crop augmentation for DINO pretraining (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021).

Every image gives two large *global* crops and a few small *local* crops; the teacher sees only the global crops,
the student sees all of them. Crops of one kind share a size, so a batch stacks into one tensor per view.
Gaussian blur and solarization from the paper are left out: the images this project pretrains on are tiny
(Fashion-MNIST, 28 px), where they mostly erase the signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision import transforms as T

__all__ = ["MultiCropTransform", "collate_multicrop"]


class MultiCropTransform:
    """Two global crops then ``num_local`` local crops of one PIL image, each an augmented, normalised tensor.

    Each crop is RandomResizedCrop, horizontal flip, a light colour jitter (brightness and contrast only for
    grayscale images), ToTensor and Normalize. The image is first converted to ``'L'`` (``grayscale=True``) or
    ``'RGB'``, so the crops always have 1 or 3 channels.

    Args:
        global_size: side of the global crops in pixels.
        local_size: side of the local crops in pixels.
        num_local: number of local crops (0 for global crops only).
        global_scale: area range of the global crops, as a fraction of the image.
        local_scale: area range of the local crops, as a fraction of the image.
        mean: per-channel normalisation mean (default 0.5 for every channel).
        std: per-channel normalisation std (default 0.5 for every channel).
        grayscale: produce 1-channel crops (else 3-channel).
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        num_local: int,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        grayscale: bool = True,
    ) -> None:
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        channels = 1 if grayscale else 3
        mean = tuple(mean) if mean is not None else (0.5,) * channels
        std = tuple(std) if std is not None else (0.5,) * channels
        self.mode = "L" if grayscale else "RGB"
        self.num_local = num_local
        jitter = T.ColorJitter(0.3, 0.3) if grayscale else T.ColorJitter(0.3, 0.3, 0.2, 0.05)
        finish = [T.RandomHorizontalFlip(), T.RandomApply([jitter], p=0.8), T.ToTensor(), T.Normalize(mean, std)]
        self.global_crop = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale), *finish])
        self.local_crop = T.Compose([T.RandomResizedCrop(local_size, scale=local_scale), *finish])

    def __call__(self, image: Image.Image) -> list[Tensor]:
        """Return ``[global1, global2, local1, ..., local_n]``, each ``[C, size, size]``."""
        image = image.convert(self.mode)
        crops = [self.global_crop(image), self.global_crop(image)]
        crops += [self.local_crop(image) for _ in range(self.num_local)]
        return crops

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, num_local={self.num_local},\n"
            f"  global={self.global_crop},\n  local={self.local_crop})"
        )


def collate_multicrop(batch: Sequence[tuple[Sequence[Tensor], Any]]) -> tuple[list[Tensor], Tensor]:
    """Collate ``(crops, label)`` samples into ``(views, labels)``.

    Args:
        batch: samples, each a list of crop tensors (same number and sizes in every sample) and a label.

    Returns:
        ``views``, one ``[B, C, H, W]`` tensor per crop position (global crops first), and the collated labels.
    """
    crops, labels = zip(*batch, strict=True)
    views = [torch.stack(view) for view in zip(*crops, strict=True)]
    return views, default_collate(list(labels))
