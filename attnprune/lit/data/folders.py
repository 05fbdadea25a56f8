"""Any folder of class subfolders (torchvision's ``ImageFolder`` layout) as a DataModule, and the helpers that read
class folders (also used by the ImageNet layouts)."""

from __future__ import annotations

import json
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
    "class_names",
    "is_image",
    "read_class_map",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation", "valid"), "test": ("test",)}


def is_image(path: Path) -> bool:
    """Whether ``path`` is a file with one of torchvision's image extensions."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the subfolders holding images (torchvision's ``ImageFolder`` order)."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def class_folder_files(folder: Path, index: dict[str, int]) -> tuple[list[str], list[int]]:
    """Image paths and labels (``index[class]``) of ``folder/<class>/**``, walked in torchvision's ``ImageFolder``
    order (classes sorted by name)."""
    paths, labels = [], []
    for name in sorted(index):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for root, _, files in sorted(os.walk(class_dir, followlinks=True)):
            for file in sorted(files):
                if is_image(Path(root) / file):
                    paths.append(str(Path(root) / file))
                    labels.append(index[name])
    return paths, labels


def read_class_map(path: str | Path) -> dict[str, int]:
    """timm's class map (``--class-map``): a text file of one class name per line, its index the line's, or a JSON
    object of class name -> index.

    Raises:
        FileNotFoundError: no such file.
        UserError: another extension, a name given twice, or an index that is not an integer >= 0.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class_map {path} does not exist; expected a .txt (one class per line) or .json file")
    if path.suffix.lower() == ".txt":
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:
            names.pop()
        mapping = {name: i for i, name in enumerate(names)}
        if len(mapping) < len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise UserError(f"class_map {path} names {', '.join(twice[:3])} on more than one line")
    elif path.suffix.lower() == ".json":
        mapping = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(mapping, dict):
            raise UserError(f"class_map {path} must be a JSON object of class name -> index")
    else:
        raise UserError(f"class_map {path} must be a .txt (one class per line) or .json (class -> index) file")
    bad = [f"{name}: {index!r}" for name, index in mapping.items() if type(index) is not int or index < 0]
    if bad or not mapping:
        raise UserError(f"class_map {path} maps classes to integers >= 0; got {', '.join(bad[:3]) or 'no class'}")
    return mapping


def class_names(index: dict[str, int]) -> list[str]:
    """The ``ClassLabel`` names of a class index: the class name at its index (the first one, where several share
    it), and the index's own number where no class has it."""
    names = [str(i) for i in range(max(index.values()) + 1)]
    for name, i in sorted(index.items(), key=lambda item: item[1], reverse=True):
        names[i] = name
    return names


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
        class_map: timm's class map (``--class-map``): a text file of one class folder name per line (the label is
            the line's index) or a JSON object of folder name -> label; every class folder must be in it. None: the
            sorted folder names are labels 0, 1, ...
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(self, root: str, cache_dir: str | None = None, class_map: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.cache_dir, self.class_map = Path(root), cache_dir, class_map

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

    SPLIT_NAMES = SPLIT_FOLDERS  # the folder names of each split, first found first

    def _split_folders(self, root: Path) -> dict[str, Path]:
        found = {}
        for split, names in self.SPLIT_NAMES.items():
            for name in names:
                if (root / name).is_dir():
                    found[split] = root / name
                    break
        return found

    def class_index(self, found: set[str]) -> dict[str, int]:
        """The label of each class found (folder names): ``class_map``'s, else the sorted names' positions.

        Raises:
            UserError: a class the class map does not have.
        """
        self.labels_from_folder_names = self.class_map is None
        if self.class_map is None:
            return {name: i for i, name in enumerate(sorted(found))}
        index = read_class_map(self.class_map)
        unknown = sorted(found - set(index))
        if unknown:
            raise UserError(
                f"{len(unknown)} classes of {self.describe_source()} are not in class_map {self.class_map} (for "
                f"example {', '.join(unknown[:3])}); every class folder needs a line (or key) in it"
            )
        return index

    def _class_folder_splits(self, folders: dict[str, Path], index: dict[str, int] | None = None) -> dict[str, Any]:
        """One dataset per split folder, labelled by ``index`` (default :meth:`class_index` of the union of every
        split's class folders)."""
        if index is None:
            index = self.class_index(set().union(*(class_folders(folder) for folder in folders.values())))
        splits = {}
        for split, folder in folders.items():
            paths, labels = class_folder_files(folder, index)
            if not paths:
                raise FileNotFoundError(f"{folder} holds no images in class subfolders ({folder}/<class>/*.jpg)")
            splits[split] = image_dataset(paths, labels, class_names(index))
        return splits
