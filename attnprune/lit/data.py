"""LightningDataModules on Hugging Face ``datasets``: ImageNet-1k, Fashion-MNIST and any image folder.

Every module yields ``(images, labels)`` batches and has three splits with one rule: ``validation`` is carved
deterministically from the source's training data (routing search and model selection use it), ``test`` is the
source's held-out split (final numbers only). Transforms come from timm's data config of the model being trained
(``resolve_model_data_config`` + ``create_transform``), so preprocessing travels with the weights.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
import yaml
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    create_transform,
    resolve_data_config,
    resolve_model_data_config,
)
from torch.utils.data import DataLoader

from attnprune.errors import UserError

__all__ = [
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "FashionMNISTDataModule",
    "check_input_size",
    "collate_images",
    "read_idx",
]

IMAGENET_DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": 0.875,
}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def collate_images(batch: list[dict[str, Any]]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """``[{image, label}, ...]`` to ``(images [B, C, H, W], labels [B])``; multi-view images (a list of crops per
    example) become a list of per-view batches."""
    labels = torch.tensor([example["label"] for example in batch])
    first = batch[0]["image"]
    if isinstance(first, (list, tuple)):
        return [torch.stack([example["image"][v] for example in batch]) for v in range(len(first))], labels
    return torch.stack([example["image"] for example in batch]), labels


def _to_pil(image: Any, mode: str) -> Image.Image:
    if isinstance(image, dict):  # an undecoded image file ({"path", "bytes"}): decoded here, so errors name it
        try:
            image = datasets.Image().decode_example(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            where = f"image file {image['path']}" if image.get("path") else "an embedded image (no file name)"
            raise UserError(f"{where} cannot be read as an image ({err}); remove or replace it") from err
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return image if image.mode == mode else image.convert(mode)  # grayscale, CMYK, RGBA, palette -> the model's


def check_input_size(model: torch.nn.Module | None, input_size: Any, where: str) -> None:
    """Refuse an input size (``(C, H, W)`` of a timm data config) that a ViT with a fixed input size cannot take
    (timm would fail mid-run with a bare AssertionError); models with ``dynamic_img_size`` take any size.

    Raises:
        ValueError: naming ``where``, the size and the size the model takes.
    """
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if embed is None or getattr(embed, "img_size", None) is None or not isinstance(proj, torch.nn.Conv2d):
        return
    channels, size = int(input_size[0]), tuple(int(v) for v in input_size[-2:])
    expected = tuple(int(v) for v in embed.img_size)
    fixed = getattr(embed, "strict_img_size", True) and not getattr(embed, "dynamic_img_size", False)
    if channels != proj.in_channels or (fixed and size != expected):
        raise UserError(
            f"{where}: input_size {[channels, *size]} does not fit the model, which takes "
            f"{[proj.in_channels, *expected]} (channels, height, width); leave data_config out to use the model's "
            "own preprocessing, or give its input_size"
        )


class ImageDataModule(L.LightningDataModule):
    """Shared machinery; subclasses implement :meth:`load_source` returning the source's splits.

    Args:
        batch_size: training batch size (per device).
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        val_size: images (int) or fraction (float) of the source's training split held out as ``validation``; at
            least one image must stay on each side.
        seed: seed of the validation carve-out and the training shuffle.
        data_config: timm data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``); default
            the trained module's ``data_config``, else timm's ImageNet defaults.
        train_scale: RandomResizedCrop scale range of the training transform.
        hflip: horizontal-flip probability of the training transform.
        train_transform: replaces the training transform (e.g. DINO's multi-crop).
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        seed: int = 0,
        data_config: dict[str, Any] | None = None,
        train_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        train_transform: Callable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["train_transform"])
        self.train_transform = train_transform
        self.splits: dict[str, datasets.Dataset | datasets.IterableDataset] = {}

    # -------------------------------------------------------------------------------------------- sources
    def load_source(self) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        """The source's own splits: ``train`` and, when it has one, ``test`` (or ``validation``, used as test)."""
        raise NotImplementedError

    HELD_OUT = ("test", "validation")  # the source's split used as our test split, first found first

    @property
    def num_classes(self) -> int:
        """Classes of the label column (a ``ClassLabel``)."""
        if not self.splits:
            self.prepare_splits()
        return next(iter(self.splits.values())).features["label"].num_classes

    def layouts_hint(self) -> str:
        """What the error messages add about the layouts this module reads."""
        return ""

    def validation_count(self, train_images: int | None) -> int:
        """Images of the training split held out as ``validation`` (``val_size`` resolved and checked)."""
        val_size = self.hparams.val_size
        default = getattr(self, "DEFAULT_VAL_IMAGES", None)
        if train_images is None:  # streaming: the length is unknown
            count = default if val_size is None else val_size
            if not isinstance(count, int) or isinstance(count, bool):
                raise UserError(f"val_size must be an image count with streaming data, got {val_size!r}")
            return count
        if val_size is None:
            count = min(default or train_images, max(1, round(0.1 * train_images)))
        elif isinstance(val_size, float):
            if not 0.0 < val_size < 1.0:
                raise UserError(f"val_size as a fraction must be in (0, 1), got {val_size}")
            count = math.ceil(val_size * train_images)
        else:
            count = val_size
        if not 1 <= count < train_images:
            raise UserError(
                f"val_size={val_size!r} holds out {count} of the {train_images} training images of "
                f"{self.describe_source()}; at least one image must stay on each side. Give a smaller count or a "
                "fraction (val_size=0.1)"
            )
        return count

    def prepare_splits(self) -> None:
        """Load the source and carve ``validation`` out of its training split (deterministic in ``seed``).

        A source without training images gives only the ``test`` split (evaluation); ``fit`` then fails in
        :meth:`setup`.
        """
        source = self.load_source()
        self.splits = {}
        train = source.get("train")
        if isinstance(train, datasets.IterableDataset):
            count = self.validation_count(None)
            self.splits = {"train": train.skip(count), "validation": train.take(count)}
        elif train is not None:
            count = self.validation_count(len(train))
            parts = train.train_test_split(test_size=count, seed=self.hparams.seed, shuffle=True)
            self.splits = {"train": parts["train"], "validation": parts["test"]}
        for name in self.HELD_OUT:
            if name in source and _labelled(source[name]):
                self.splits["test"] = source[name]
                break
        if not self.splits:
            raise FileNotFoundError(
                f"{self.describe_source()} has no labelled split (found: {', '.join(source) or 'none'}). "
                f"{self.layouts_hint()}".strip()
            )

    # ----------------------------------------------------------------------------------------- transforms
    def resolved_data_config(self) -> dict[str, Any]:
        """The timm data config in force: explicit, else the trained module's, else ImageNet defaults."""
        if self.hparams.data_config is not None:
            return resolve_data_config(self.hparams.data_config)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and getattr(module, "data_config", None) is not None:
            return dict(module.data_config)
        return resolve_data_config(pretrained_cfg=IMAGENET_DATA_CONFIG)

    def make_transform(self, training: bool) -> Callable[[Any], torch.Tensor]:
        config = self.resolved_data_config()
        mode = "L" if config["input_size"][0] == 1 else "RGB"
        if training and self.train_transform is not None:
            transform = self.train_transform
        else:
            transform = (
                create_transform(
                    **config,
                    is_training=training,
                    scale=self.hparams.train_scale,
                    hflip=self.hparams.hflip,
                    color_jitter=None,
                    auto_augment=None,
                )
                if training
                else create_transform(**config)
            )

        def apply(image: Any) -> torch.Tensor:
            return transform(_to_pil(image, mode))

        return apply

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:  # before any image is read: a size the model cannot take fails here, in one line
            check_input_size(getattr(module, "backbone", None), self.resolved_data_config()["input_size"], "data")
        if not self.splits:
            self.prepare_splits()
        if stage in ("fit", "validate") and "train" not in self.splits:
            raise UserError(
                f"{self.describe_source()} has no training split, which `{stage}` needs (the validation split is "
                f"carved out of it); it has only the held-out split, which `test` (evaluate.py) reads. "
                f"{self.layouts_hint()}".strip()
            )
        self._transforms = {split: self.make_transform(split == "train") for split in ("train", "validation", "test")}
        self._transforms["bank"] = self._transforms["test"]

    def _dataset(self, split: str) -> datasets.Dataset | datasets.IterableDataset:
        needed = "train" if split == "bank" else split
        if needed not in self.splits:
            what = "held-out split (add a test/ or val/ folder)" if split == "test" else "training split"
            raise UserError(
                f"{type(self).__name__} has no {split!r} split: {self.describe_source()} has no {what}. "
                f"{self.layouts_hint()}".strip()
            )
        transform = self._transforms[split]

        def apply(batch: dict[str, list]) -> dict[str, list]:
            return {"image": [transform(image) for image in batch["image"]], "label": batch["label"]}

        data = self.splits["train" if split == "bank" else split]
        feature = data.features.get("image") if data.features is not None else None
        if isinstance(data, datasets.Dataset) and isinstance(feature, datasets.Image) and feature.decode:
            data = data.cast_column("image", datasets.Image(decode=False))  # decoded by _to_pil, naming the file
        if isinstance(data, datasets.IterableDataset):
            return data.map(apply, batched=True, batch_size=self.hparams.batch_size)
        return data.with_transform(apply)

    def describe_source(self) -> str:
        return type(self).__name__

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self._dataset(split)
        streaming = isinstance(data, datasets.IterableDataset)
        batch = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size or self.hparams.batch_size
        generator = torch.Generator().manual_seed(self.hparams.seed)
        sampler = None
        if split != "train" and not streaming and self.trainer is not None and self.trainer.world_size > 1:
            # Evaluate every image exactly once across processes: the default sampler pads the last shard with
            # repeated images, which changes the top-1 of a DDP run.
            sampler = UnrepeatedDistributedSampler(
                data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
        return DataLoader(
            data,
            batch_size=batch,
            sampler=sampler,
            shuffle=shuffle and not streaming,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_images,
            generator=generator,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def for_model(self, model: torch.nn.Module) -> ImageDataModule:
        """Use ``model``'s preprocessing (its timm data config) unless a data config was given; returns self.

        Raises:
            ValueError: a given data config's ``input_size`` does not fit the model.
        """
        if self.hparams.data_config is None:
            self.hparams.data_config = resolve_model_data_config(model)
        check_input_size(model, self.resolved_data_config()["input_size"], "data_config")
        return self

    def take(self, split: str, images: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``images`` preprocessed images of ``split`` as ``(images, labels)`` batches, in order."""
        self.setup()
        loader = {"validation": self.val_dataloader, "test": self.test_dataloader}[split]()
        batches, seen = [], 0
        for x, y in loader:
            batches.append((x[: images - seen], y[: images - seen]))
            seen += len(batches[-1][1])
            if seen >= images:
                break
        return batches

    def bank_dataloader(self) -> DataLoader:
        """The training split with evaluation transforms, in order (k-NN memory banks, feature statistics)."""
        return self._loader("bank", shuffle=False)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation", "valid"), "test": ("test",)}
WNID = re.compile(r"n\d{8}")
FLAT_VAL = re.compile(r"ILSVRC2012_val_\d+", re.IGNORECASE)
VAL_SOLUTION = "LOC_val_solution.csv"
IMAGENET_LAYOUTS = (
    "class folders: <root>/train/<wnid>/*.JPEG and/or <root>/val/<wnid>/*.JPEG (or test/), or <root>/<wnid>/*.JPEG "
    "alone for evaluation",
    f"the official flat validation folder: ILSVRC2012_val_*.JPEG with Kaggle's {VAL_SOLUTION} beside the images "
    "or in their parent folder (Kaggle's ILSVRC/Data/CLS-LOC tree included)",
    "a datasets save_to_disk folder (dataset_dict.json or state.json)",
    "a folder of parquet files in the hub's layout: <root>/data/{train,validation,test}-*.parquet",
    "a hub dataset id such as ILSVRC/imagenet-1k (read from the local Hugging Face cache when offline)",
)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the subfolders holding images (torchvision's ``ImageFolder`` order)."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _class_folder_files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image paths and labels of ``folder/<class>/**``, walked in torchvision's ``ImageFolder`` order."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for root, _, files in sorted(os.walk(class_dir, followlinks=True)):
            for file in sorted(files):
                if _is_image(Path(root) / file):
                    paths.append(str(Path(root) / file))
                    labels.append(label)
    return paths, labels


def _image_dataset(paths: list[str], labels: list[int], classes: list[str]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)


def _is_flat_val(folder: Path) -> bool:
    return folder.is_dir() and any(FLAT_VAL.match(entry.name) for entry in folder.iterdir() if _is_image(entry))


def read_val_solution(path: Path) -> dict[str, str]:
    """Kaggle's ``LOC_val_solution.csv``: image id (``ILSVRC2012_val_00000001``) -> wnid (the first box's class)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise UserError(f"{path} is not Kaggle's {VAL_SOLUTION}: expected the columns ImageId,PredictionString")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


def _labelled(data: datasets.Dataset | datasets.IterableDataset) -> bool:
    """False for a split whose labels are all -1 (the hub's ImageNet test split)."""
    if not isinstance(data, datasets.Dataset) or len(data) == 0:
        return True
    top = pc.max(data.data.column("label")).as_py()
    return top is not None and top >= 0


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
            classes = sorted(set().union(*(_class_folders(folder) for folder in folders.values())))
        splits = {}
        for split, folder in folders.items():
            paths, labels = _class_folder_files(folder, classes)
            if not paths:
                raise FileNotFoundError(f"{folder} holds no images in class subfolders ({folder}/<class>/*.jpg)")
            splits[split] = _image_dataset(paths, labels, classes)
        return splits


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k in any layout users have it, with labels in timm's class order (sorted wnids).

    Layouts (``source``):

    - class folders: ``train/<wnid>/`` and/or ``val/<wnid>/`` (or ``test/``), or the ``<wnid>/`` folders alone;
    - the official flat validation folder (``ILSVRC2012_val_*.JPEG``) with Kaggle's ``LOC_val_solution.csv`` beside
      the images or in their parent folder, with or without ``train/<wnid>/`` beside it;
    - a ``datasets`` ``save_to_disk`` folder;
    - a folder of parquet files in the hub's layout (``data/validation-*.parquet``, ...);
    - a hub dataset id (gated: ``huggingface-cli login``), read from the local Hugging Face cache when offline.

    The source's validation split (50,000 images) is our test split; ``val_size`` training images are held out as
    our validation split. Without training images only ``test`` works (``fit`` and ``validate`` raise).

    Args:
        source: a local folder in one of the layouts above, or a hub dataset id.
        streaming: stream the hub dataset instead of downloading it (``val_size`` must then be a count).
        val_size: training images held out for validation; default 10,000 or a tenth of the training split,
            whichever is smaller.
        hub_cache_dir: Hugging Face hub cache searched for a hub id's files (default: ``HF_HUB_CACHE``).
        **kwargs: see :class:`ImageDataModule`.
    """

    HELD_OUT = ("validation", "test")  # the hub's ImageNet test split has no labels
    DEFAULT_VAL_IMAGES = 10_000

    def __init__(
        self,
        source: str = "ILSVRC/imagenet-1k",
        streaming: bool = False,
        val_size: int | float | None = None,
        hub_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=source, val_size=val_size, **kwargs)
        self.source, self.streaming, self.hub_cache_dir = source, streaming, hub_cache_dir

    def describe_source(self) -> str:
        return f"ImageNet source {self.source}"

    def layouts_hint(self) -> str:
        return "Supported layouts: " + "; ".join(f"({i}) {text}" for i, text in enumerate(IMAGENET_LAYOUTS, 1))

    def load_source(self) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        path = Path(self.source).expanduser()
        if path.is_dir():
            return self._load_local(path)
        if self.source.startswith((".", "/", "~")) or path.exists():
            raise FileNotFoundError(f"ImageNet folder {self.source} does not exist. {self.layouts_hint()}")
        return self._load_hub()

    # ----------------------------------------------------------------------------------------------- local
    def _load_local(self, root: Path) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(root))
            # a single saved split is taken as the held-out one
            return self._with_labels(dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"test": loaded})
        parquet = self._parquet_files(root)
        if parquet:
            return self._load_parquet(root, parquet)
        kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
        data_root = kaggle if kaggle.is_dir() else root
        folders = self._split_folders(data_root)
        if not folders:
            if _is_flat_val(data_root):
                return {"validation": self._flat_val(data_root, extra_dirs=[root])}
            if any(WNID.fullmatch(name) for name in _class_folders(data_root)):
                return self._class_folder_splits({"validation": data_root})
            raise FileNotFoundError(f"{root} is in no ImageNet layout this module reads. {self.layouts_hint()}")
        flat = {split: folder for split, folder in folders.items() if split != "train" and _is_flat_val(folder)}
        class_splits = {split: folder for split, folder in folders.items() if split not in flat}
        solutions = {split: self._find_val_solution(folder, [root]) for split, folder in flat.items()}
        wnids = set().union(*(_class_folders(folder) for folder in class_splits.values()))
        for solution in solutions.values():
            wnids |= set(read_val_solution(solution).values())
        classes = sorted(wnids)
        splits = self._class_folder_splits(class_splits, classes) if class_splits else {}
        for split, folder in flat.items():
            splits[split] = self._flat_val(folder, classes=classes, solution=solutions[split])
        return splits

    def _find_val_solution(self, folder: Path, extra_dirs: list[Path]) -> Path:
        candidates = [folder / VAL_SOLUTION, folder.parent / VAL_SOLUTION] + [d / VAL_SOLUTION for d in extra_dirs]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{folder} is ImageNet's flat validation folder (ILSVRC2012_val_*.JPEG), whose labels are in Kaggle's "
            f"{VAL_SOLUTION}; it is in none of {', '.join(str(c.parent) for c in candidates)}. Put it beside the "
            f"images or in their parent folder, or sort the images into val/<wnid>/ folders. {self.layouts_hint()}"
        )

    def _flat_val(
        self,
        folder: Path,
        classes: list[str] | None = None,
        solution: Path | None = None,
        extra_dirs: list[Path] = (),
    ) -> datasets.Dataset:
        """The flat validation folder, labelled by ``LOC_val_solution.csv``."""
        solution = solution or self._find_val_solution(folder, list(extra_dirs))
        wnid_of = read_val_solution(solution)
        classes = classes or sorted(set(wnid_of.values()))
        index = {wnid: i for i, wnid in enumerate(classes)}
        files = sorted(entry for entry in folder.iterdir() if _is_image(entry) and FLAT_VAL.match(entry.name))
        missing = [file.name for file in files if file.stem not in wnid_of]
        if missing:
            raise UserError(
                f"{len(missing)} images of {folder} have no row in {solution} (for example {', '.join(missing[:3])})"
            )
        return _image_dataset([str(file) for file in files], [index[wnid_of[file.stem]] for file in files], classes)

    @staticmethod
    def _parquet_files(root: Path) -> dict[str, list[str]]:
        """Parquet files per split: ``data/<split>-*.parquet`` (the hub's layout), ``<split>-*.parquet`` or
        ``[data/]<split>/*.parquet``."""
        names = {name: split for split, aliases in SPLIT_FOLDERS.items() for name in aliases}
        found: dict[str, list[str]] = {}
        for folder in (root / "data", root):
            if not folder.is_dir():
                continue
            for file in sorted(folder.glob("*.parquet")):
                split = names.get(re.split(r"[-_.]", file.name, maxsplit=1)[0].lower())
                if split is not None:
                    found.setdefault(split, []).append(str(file))
            for name, split in names.items():
                found.setdefault(split, []).extend(sorted(str(f) for f in (folder / name).glob("*.parquet")))
        return {split: files for split, files in found.items() if files}

    def _load_parquet(self, root: Path, files: dict[str, list[str]]) -> dict[str, Any]:
        loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=self.cache_dir, streaming=self.streaming)
        return self._with_labels(dict(loaded), readme=root / "README.md")

    def _with_labels(self, splits: dict[str, Any], readme: Path | None = None) -> dict[str, Any]:
        """Check every split has ``image`` and ``label`` columns; a plain integer label becomes a ``ClassLabel`` (with
        the class names of the hub card's ``dataset_info`` when there is one)."""
        for split, data in splits.items():
            columns = set(data.features or {})
            if not {"image", "label"} <= columns:
                raise UserError(
                    f"split {split!r} of {self.describe_source()} has columns {sorted(columns)}; an ImageNet dataset "
                    "needs 'image' and 'label' columns"
                )
            if not isinstance(data.features["label"], datasets.ClassLabel):
                names = _card_class_names(readme) if readme is not None else None
                if names is None:  # integer labels without names: ImageNet-1k's class indices
                    tops = [pc.max(d.data.column("label")).as_py() for d in splits.values() if hasattr(d, "data")]
                    names = [str(i) for i in range(max([1000] + [top + 1 for top in tops if top is not None]))]
                splits[split] = data.cast_column("label", datasets.ClassLabel(names=names))
        return splits

    # ------------------------------------------------------------------------------------------------- hub
    def _load_hub(self) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        if offline:
            snapshot = self._hub_snapshot()
            if snapshot is not None:
                return self._load_local(snapshot)
        try:
            source = datasets.load_dataset(self.source, streaming=self.streaming, cache_dir=self.cache_dir)
        except Exception as err:  # offline, gated, unknown id: all end the same way for the user
            snapshot = None if offline else self._hub_snapshot()
            if snapshot is not None:
                return self._load_local(snapshot)
            raise FileNotFoundError(
                f"could not load ImageNet from the hub id {self.source!r} ({type(err).__name__}: {err}), and the local "
                "Hugging Face cache has no copy of it. Provide it as a local folder with train/<wnid>/*.JPEG and "
                "val/<wnid>/*.JPEG (source=/path/to/imagenet), or log in to the Hugging Face hub "
                f"(huggingface-cli login) with access to ILSVRC/imagenet-1k. {self.layouts_hint()}"
            ) from err
        return {split: source[split] for split in source}

    def _hub_snapshot(self) -> Path | None:
        """The hub id's files in the local Hugging Face cache, if any were downloaded."""
        try:
            path = huggingface_hub.snapshot_download(
                self.source, repo_type="dataset", cache_dir=self.hub_cache_dir, local_files_only=True
            )
        except Exception:  # not in the cache (LocalEntryNotFoundError), or not a valid id
            return None
        path = Path(path)
        return path if self._parquet_files(path) or (path / "dataset_dict.json").is_file() else None


def _card_class_names(readme: Path) -> list[str] | None:
    """Class names of the ``label`` feature in a hub dataset card's YAML header, if it has them."""
    if not readme.is_file():
        return None
    text = readme.read_text()
    if not text.startswith("---"):
        return None
    header = yaml.safe_load(text.split("---", 2)[1]) or {}
    infos = header.get("dataset_info", [])
    for info in infos if isinstance(infos, list) else [infos]:
        for feature in info.get("features", []):
            if feature.get("name") == "label" and "class_label" in feature.get("dtype", {}):
                names = feature["dtype"]["class_label"]["names"]
                return [names[k] for k in sorted(names, key=int)] if isinstance(names, dict) else list(names)
    return None


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
