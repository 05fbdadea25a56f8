"""Any folder of class subfolders (torchvision's ``ImageFolder`` layout) as a DataModule, and the helpers that read
class folders (also used by the ImageNet layouts)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from attnprune.errors import UserError
from attnprune.lit.data.base import ImageDataModule

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDERS",
    "ImageFolderDataModule",
    "class_folder_files",
    "class_folders",
    "image_dataset",
    "is_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation", "valid"), "test": ("test",)}


def is_image(path: Path) -> bool:
    """Whether ``path`` is a file with one of torchvision's image extensions."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the subfolders holding images (torchvision's ``ImageFolder`` order)."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def class_folder_files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image paths and labels of ``folder/<class>/**``, walked in torchvision's ``ImageFolder`` order."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for root, _, files in sorted(os.walk(class_dir, followlinks=True)):
            for file in sorted(files):
                if is_image(Path(root) / file):
                    paths.append(str(Path(root) / file))
                    labels.append(label)
    return paths, labels


def image_dataset(paths: list[str], labels: list[int], classes: list[str]) -> datasets.Dataset:
    """A ``datasets.Dataset`` of image files (decoded lazily) and their labels as a ``ClassLabel`` of ``classes``."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)


class ImageFolderDataModule(ImageDataModule):
    """Any folder of class subfolders, read as torchvision's ``ImageFolder`` reads it (classes are the sorted folder
    names, so ImageNet's wnids come out in timm's class order).

    ``root/train/<class>/*.jpg`` is the training split; ``root/test/`` or ``root/val/`` (ImageNet's layout) the test
    split. Either may be missing: evaluation needs no training images, and ``fit`` fails only then.

    Args:
        root: the folder.
        cache_dir: ``datasets`` cache (default: Hugging Face's) of the sources ``datasets`` prepares (parquet, hub).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(self, root: str, cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.cache_dir = Path(root), cache_dir

    def describe_source(self) -> str:
        return f"image folder {self.root}"

    def load_source(self) -> dict[str, datasets.Dataset]:
        folders = self._split_folders(self.root)
        if not folders:
            raise FileNotFoundError(
                f"image folder {self.root} has no train/ subfolder and no val/ or test/ subfolder. Provide the data as "
                f"{self.root}/train/<class>/*.jpg with {self.root}/val/<class>/*.jpg (or test/) for the held-out split"
            )
        splits = self._class_folder_splits(folders)
        names = next(iter(splits.values())).features["label"].names
        used = sorted({names[label] for split in splits.values() for label in set(split["label"])})
        if len(used) < 2:
            raise UserError(
                f"image folder {self.root} has images of {len(used)} class ({', '.join(used)}); a classifier needs at "
                f"least two class subfolders with images ({self.root}/<split>/<class>/*.jpg)"
            )
        return splits

    @staticmethod
    def _split_folders(root: Path) -> dict[str, Path]:
        found = {}
        for split, names in SPLIT_FOLDERS.items():
            for name in names:
                if (root / name).is_dir():
                    found[split] = root / name
                    break
        return found

    @staticmethod
    def _class_folder_splits(folders: dict[str, Path], classes: list[str] | None = None) -> dict[str, datasets.Dataset]:
        """One dataset per split folder; the classes are the union of every split's class folders, sorted."""
        if classes is None:
            classes = sorted(set().union(*(class_folders(folder) for folder in folders.values())))
        splits = {}
        for split, folder in folders.items():
            paths, labels = class_folder_files(folder, classes)
            if not paths:
                raise FileNotFoundError(f"{folder} holds no images in class subfolders ({folder}/<class>/*.jpg)")
            splits[split] = image_dataset(paths, labels, classes)
        return splits
