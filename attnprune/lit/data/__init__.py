"""LightningDataModules on Hugging Face ``datasets``, one file per source.

- :mod:`~attnprune.lit.data.base`: :class:`ImageDataModule`, what every source shares (splits, timm transforms,
  loaders) and the batch collation.
- :mod:`~attnprune.lit.data.checks`: what the data must share with the model (input size, labels within its head),
  checked before any image is read.
- :mod:`~attnprune.lit.data.splits`: the split protocol: carve-outs (``val_size``, ``search_split``) and the record
  of which source images a search read.
- :mod:`~attnprune.lit.data.sampling`: the training order and augmentations, seeded by the epoch and the image, so a
  resumed run draws them again exactly.
- :mod:`~attnprune.lit.data.folders`: :class:`ImageFolderDataModule`, any folder of class subfolders.
- :mod:`~attnprune.lit.data.imagenet`: :class:`ImageNetDataModule`, ImageNet-1k in every layout users have it;
  :mod:`~attnprune.lit.data.imagenet_labels` the flat validation folder's labels (Kaggle's CSV, the devkit).
- :mod:`~attnprune.lit.data.fashion_mnist`: :class:`FashionMNISTDataModule`, IDX files or the hub.

Configs name the modules by their package path (``class_path: attnprune.lit.data.FashionMNISTDataModule``).
"""

from attnprune.lit.data.base import ImageDataModule, collate_images
from attnprune.lit.data.checks import check_input_size
from attnprune.lit.data.fashion_mnist import FASHION_MNIST_DIR, FashionMNISTDataModule, read_idx
from attnprune.lit.data.folders import ImageFolderDataModule
from attnprune.lit.data.imagenet import ImageNetDataModule
from attnprune.lit.data.imagenet_labels import read_devkit_labels, read_val_solution

__all__ = [
    "FASHION_MNIST_DIR",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "check_input_size",
    "collate_images",
    "read_idx",
    "read_devkit_labels",
    "read_val_solution",
]
