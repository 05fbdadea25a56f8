"""Multi-crop augmentation for DINO pretraining (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021).

Every image gives two large *global* crops and a few small *local* crops; the teacher sees only the global crops,
the student sees all of them. Crops of one kind share a size, so a batch stacks into one tensor per view
(:func:`attnprune.lit.data.collate_images` turns a batch of crop lists into a list of per-view batches).
Gaussian blur and solarization from the paper are left out: the images this project pretrains on are tiny
(Fashion-MNIST, 28 px), where they mostly erase the signal.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from attnprune.errors import UserError

__all__ = ["MultiCropTransform"]


class MultiCropTransform:
    """Two global crops then ``num_local`` local crops of one PIL image, each an augmented, normalised tensor.

    Each crop is RandomResizedCrop, horizontal flip, a light colour jitter (brightness and contrast only for
    grayscale images), ToTensor and Normalize. Given as an :class:`~attnprune.lit.data.ImageDataModule`'s
    ``train_transform``, it receives images already converted to the model's mode (``'L'`` for a 1-channel model,
    ``'RGB'`` otherwise), which the default ``grayscale=None`` keeps.

    Args:
        global_size: side of the global crops in pixels.
        local_size: side of the local crops in pixels.
        num_local: number of local crops (0 for global crops only).
        global_scale: area range of the global crops, as a fraction of the image.
        local_scale: area range of the local crops, as a fraction of the image.
        mean: per-channel normalisation mean (default 0.5 for every channel); use the model's ``pretrained_cfg``
            mean so that training crops match its evaluation transform.
        std: per-channel normalisation std (default 0.5 for every channel).
        grayscale: ``True`` converts every image to ``'L'`` (1-channel crops), ``False`` to ``'RGB'`` (3 channels);
            ``None`` keeps ``'L'`` images and converts any other mode to ``'RGB'``.
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
        grayscale: bool | None = None,
    ) -> None:
        if num_local < 0:
            raise UserError(f"num_local must be >= 0, got {num_local}")
        mean = tuple(mean) if mean is not None else (0.5,)  # one value broadcasts over the channels
        std = tuple(std) if std is not None else (0.5,)
        self.mode = None if grayscale is None else "L" if grayscale else "RGB"
        self.num_local = num_local
        self.crops: dict[str, tuple[T.Compose, T.Compose]] = {}
        for mode, jitter in (("L", T.ColorJitter(0.3, 0.3)), ("RGB", T.ColorJitter(0.3, 0.3, 0.2, 0.05))):
            finish = [T.RandomHorizontalFlip(), T.RandomApply([jitter], p=0.8), T.ToTensor(), T.Normalize(mean, std)]
            self.crops[mode] = (
                T.Compose([T.RandomResizedCrop(global_size, scale=global_scale), *finish]),
                T.Compose([T.RandomResizedCrop(local_size, scale=local_scale), *finish]),
            )

    def __call__(self, image: Image.Image) -> list[Tensor]:
        """Return ``[global1, global2, local1, ..., local_n]``, each ``[C, size, size]``."""
        mode = self.mode or ("L" if image.mode == "L" else "RGB")
        image = image if image.mode == mode else image.convert(mode)
        global_crop, local_crop = self.crops[mode]
        return [global_crop(image), global_crop(image)] + [local_crop(image) for _ in range(self.num_local)]

    def __repr__(self) -> str:
        global_crop, local_crop = self.crops[self.mode or "RGB"]
        return (
            f"{type(self).__name__}(mode={self.mode or 'kept'!r}, num_local={self.num_local},\n"
            f"  global={global_crop},\n  local={local_crop})"
        )
