"""LightningDataModules on Hugging Face ``datasets``: ImageNet-1k, Fashion-MNIST and any image folder.

Every module yields ``(images, labels)`` batches and has three splits with one rule: ``validation`` is carved
deterministically from the source's training data (routing search and model selection use it), ``test`` is the
source's held-out split (final numbers only). Transforms come from timm's data config of the model being trained
(``resolve_model_data_config`` + ``create_transform``), so preprocessing travels with the weights.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
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

__all__ = [
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "FashionMNISTDataModule",
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
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return image if image.mode == mode else image.convert(mode)  # grayscale, CMYK, RGBA, palette -> the model's


class ImageDataModule(L.LightningDataModule):
    """Shared machinery; subclasses implement :meth:`load_source` returning the source's splits.

    Args:
        batch_size: training batch size (per device).
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        val_size: images (int) or fraction (float) of the source's training split held out as ``validation``.
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

    @property
    def num_classes(self) -> int:
        """Classes of the label column (a ``ClassLabel``)."""
        if not self.splits:
            self.prepare_splits()
        return self.splits["train"].features["label"].num_classes

    def prepare_splits(self) -> None:
        """Load the source and carve ``validation`` out of its training split (deterministic in ``seed``)."""
        source = self.load_source()
        train = source["train"]
        val_size = self.hparams.val_size
        if isinstance(train, datasets.IterableDataset):
            if not isinstance(val_size, int):
                raise ValueError(f"val_size must be an image count with streaming data, got {val_size!r}")
            self.splits = {"train": train.skip(val_size), "validation": train.take(val_size)}
        else:
            parts = train.train_test_split(test_size=val_size, seed=self.hparams.seed, shuffle=True)
            self.splits = {"train": parts["train"], "validation": parts["test"]}
        held_out = source.get("test", source.get("validation"))
        if held_out is not None:
            self.splits["test"] = held_out

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
        if not self.splits:
            self.prepare_splits()
        self._transforms = {split: self.make_transform(split == "train") for split in ("train", "validation", "test")}
        self._transforms["bank"] = self._transforms["test"]

    def _dataset(self, split: str) -> datasets.Dataset | datasets.IterableDataset:
        if split not in self.splits and split != "bank":
            raise ValueError(
                f"{type(self).__name__} has no {split!r} split: {self.describe_source()} has no held-out "
                "split (add a test/ or val/ folder)"
            )
        transform = self._transforms[split]

        def apply(batch: dict[str, list]) -> dict[str, list]:
            return {"image": [transform(image) for image in batch["image"]], "label": batch["label"]}

        data = self.splits["train" if split == "bank" else split]
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
        """Use ``model``'s preprocessing (its timm data config) unless a data config was given; returns self."""
        if self.hparams.data_config is None:
            self.hparams.data_config = resolve_model_data_config(model)
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


class ImageFolderDataModule(ImageDataModule):
    """Any folder of class subfolders, read with ``datasets``' ``imagefolder`` builder.

    ``root/train/<class>/*.jpg`` is required; ``root/test/`` or ``root/val/`` (ImageNet's layout) is the test split.

    Args:
        root: the folder.
        cache_dir: ``datasets`` cache (default: Hugging Face's).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(self, root: str, cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.cache_dir = Path(root), cache_dir

    def describe_source(self) -> str:
        return f"image folder {self.root}"

    def load_source(self) -> dict[str, datasets.Dataset]:
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} has no train/ subfolder. Provide the data as "
                f"{self.root}/train/<class>/*.jpg with {self.root}/val/<class>/*.jpg (or test/) for the held-out split"
            )
        return dict(datasets.load_dataset("imagefolder", data_dir=str(self.root), cache_dir=self.cache_dir))


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k from the Hugging Face hub or a local ``train/`` + ``val/`` folder.

    The source's ``validation`` split (50,000 images) is the test split; ``val_size`` training images are held out
    as our validation split.

    Args:
        source: hub dataset id (gated: log in with ``huggingface-cli login`` or set ``HF_TOKEN``) or a local folder.
        streaming: stream the hub dataset instead of downloading it (``val_size`` must then be a count).
        val_size: training images held out for validation.
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self, source: str = "ILSVRC/imagenet-1k", streaming: bool = False, val_size: int | float = 10_000, **kwargs: Any
    ) -> None:
        super().__init__(root=source, val_size=val_size, **kwargs)
        self.source, self.streaming = source, streaming

    def describe_source(self) -> str:
        return f"ImageNet source {self.source}"

    def load_source(self) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        if Path(self.source).is_dir():
            return super().load_source()
        if self.source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"ImageNet folder {self.source} does not exist")
        try:
            source = datasets.load_dataset(self.source, streaming=self.streaming, cache_dir=self.cache_dir)
        except Exception as err:  # offline, gated, unknown id: all end the same way for the user
            raise FileNotFoundError(
                f"could not load ImageNet from the hub id {self.source!r} ({type(err).__name__}: {err}). Provide it "
                "as a local folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (source=/path/to/imagenet), or log "
                "in to the Hugging Face hub (huggingface-cli login) with access to ILSVRC/imagenet-1k"
            ) from err
        return {"train": source["train"], "test": source["validation"]}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip or raw) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but the file holds {array.size} values")
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
