"""Fashion-MNIST from its IDX files (local, or Debian's ``dataset-fashion-mnist``) or the hub."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from attnprune.errors import UserError
from attnprune.lit.data.base import ImageDataModule

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_HUB", "FashionMNISTDataModule", "read_idx"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip or raw) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path}: header says {shape} but the file holds {array.size} values")
    return array.reshape(shape)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (28 x 28 grayscale, 10 classes) from local IDX files or the hub.

    Args:
        root: a folder with the four IDX files (``.gz`` or not; Debian's ``dataset-fashion-mnist`` installs them in
            /usr/share/datasets/fashion-mnist) or the hub id ``zalando-datasets/fashion_mnist``.
        val_size: training images held out for validation (55,000 remain for training).
        **kwargs: see :class:`ImageDataModule`; the default training transform is a mild random crop and flip.
    """

    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(
        self,
        root: str = FASHION_MNIST_DIR,
        val_size: int | float = 5_000,
        train_scale: tuple[float, float] = (0.7, 1.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(val_size=val_size, train_scale=train_scale, **kwargs)
        self.root = root

    def describe_source(self) -> str:
        return f"Fashion-MNIST source {self.root}"

    def _idx_file(self, name: str) -> Path:
        for candidate in (Path(self.root) / name, Path(self.root) / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"Fashion-MNIST file {name}[.gz] not found in {self.root}. Provide the data by one of: "
            f"`apt-get install dataset-fashion-mnist` (installs the IDX files in {FASHION_MNIST_DIR}); "
            "root=/folder/with/the/four/IDX/files; or root='zalando-datasets/fashion_mnist' (the hub, needs network)"
        )

    def load_source(self) -> dict[str, datasets.Dataset]:
        if self.root == FASHION_MNIST_HUB:
            return dict(datasets.load_dataset(FASHION_MNIST_HUB))
        features = datasets.Features(
            {"image": datasets.Array2D(shape=(28, 28), dtype="uint8"), "label": datasets.ClassLabel(names=self.CLASSES)}
        )
        splits = {}
        for split, (images, labels) in FASHION_MNIST_FILES.items():
            pixels, targets = read_idx(self._idx_file(images)), read_idx(self._idx_file(labels))
            splits[split] = datasets.Dataset.from_dict({"image": pixels, "label": targets}, features=features)
        return splits
