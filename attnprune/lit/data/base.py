"""The DataModule every source shares: splits, transforms from the model's timm data config, loaders.

Every module yields ``(images, labels)`` batches and has three splits, ``validation`` and ``test`` never sharing an
image: ``validation`` is what routing search, analysis and model selection read, ``test`` what final numbers are
reported on. By default ``validation`` is carved (seeded) out of the source's training split and ``test`` is the
source's held-out split; with ``search_split`` (a source with only ImageNet's validation images, say), both are carved
out of the held-out split: a seeded search split, and the rest to report on (:mod:`~attnprune.lit.data.splits`).
Transforms come from timm's data config of the model being trained (``resolve_model_data_config`` +
``create_transform``), so preprocessing travels with the weights.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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

from attnprune.errors import UserError
from attnprune.lit.data import checks
from attnprune.lit.data.sampling import AugmentedSplit, EpochSampler, resume_point, training_position
from attnprune.lit.data.splits import Origin, carve, searched_overlap, split_count, split_record

__all__ = ["ImageDataModule", "collate_images"]

NO_VALIDATION = (
    "{source} has no training split to carve the validation split out of (what search.py, analyze.py and `validate` "
    "read); give search_split (--data.init_args.search_split 10000, or a fraction) to carve a seeded search split out "
    "of its held-out split, whose other images stay the test split that evaluate.py reports on"
)
IMAGENET_DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": 0.875,
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


class ImageDataModule(L.LightningDataModule):
    """Shared machinery; subclasses implement :meth:`load_source` returning the source's splits.

    Args:
        batch_size: training batch size (per device).
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        val_size: images (int) or fraction (float) of the source's training split held out as ``validation``; at
            least one image must stay on each side.
        seed: seed of the carve-outs (``val_size``, ``search_split``), of the training order and of the training
            augmentations (each epoch's drawn from the seed and the epoch alone: :mod:`~attnprune.lit.data.sampling`).
        search_split: images (int) or fraction (float) of the source's held-out split (ImageNet's 50,000 validation
            images) carved out, seeded by ``seed``, as the ``validation`` split that search.py and analyze.py read;
            the rest is the ``test`` split that evaluate.py reports on, so the two share no image. For sources without
            training images (val-only ImageNet); the training split, if any, is then kept whole. None: ``validation``
            is carved out of the training split (``val_size``).
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
        search_split: int | float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["train_transform"])
        checks.check_settings(type(self).__name__, self.hparams)
        self.train_transform = train_transform
        self.splits: dict[str, datasets.Dataset | datasets.IterableDataset] = {}
        self.origins: dict[str, Origin] = {}  # validation and test: the source split and positions of their images
        # labels are the positions of the sorted class folder names, which no source or class map gave
        self.labels_from_folder_names = False
        self._position: dict[str, Any] = {}  # where a resumed training stands (training_position), from its checkpoint

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

    def check_classes(self, classes: int) -> None:
        """Refuse labels a head of ``classes`` classes cannot be scored on, before any image is read (0: a headless
        model, whose labels go unused; see :func:`~attnprune.lit.data.checks.check_labels`).

        Raises:
            UserError: a label beyond the head, or fewer classes than it has named only by their sorted folders.
        """
        if classes and not self.splits:
            self.prepare_splits()
        checks.check_labels(self.splits, classes, self.describe_source(), self.labels_from_folder_names)

    def validation_count(self, train_images: int | None) -> int:
        """Images of the training split held out as ``validation`` (``val_size`` resolved and checked)."""
        val_size = self.hparams.val_size
        if val_size is None:
            default = getattr(self, "DEFAULT_VAL_IMAGES", None)
            val_size = default if train_images is None else min(default or train_images, round(0.1 * train_images) or 1)
        return split_count(val_size, train_images, "val_size", f"training images of {self.describe_source()}")

    def prepare_splits(self) -> None:
        """Load the source and carve ``validation`` out of its training split, or with ``search_split`` out of its
        held-out split (deterministic in ``seed``; see :mod:`~attnprune.lit.data.splits`).

        A source without training images and without ``search_split`` gives only the ``test`` split (evaluation);
        ``fit``, ``validate`` and the search then fail in :meth:`setup`.
        """
        source = self.load_source()
        self.splits, self.origins = {}, {}
        held = next((name for name in self.HELD_OUT if name in source and checks.labelled(source[name])), None)
        if held is not None:
            size = checks.split_size(source[held])
            self.splits["test"], self.origins["test"] = (
                source[held],
                (held, range(sys.maxsize if size is None else size)),
            )
        train, seed = source.get("train"), self.hparams.seed
        if self.hparams.search_split is not None:
            if held is None:
                raise UserError(
                    f"search_split carves the search split out of the held-out split, but {self.describe_source()} "
                    f"has none with labels (found: {', '.join(source) or 'none'})"
                )
            what = f"images of the {held} split of {self.describe_source()}"
            count = split_count(self.hparams.search_split, checks.split_size(source[held]), "search_split", what)
            self.splits["validation"], self.splits["test"], self.origins["validation"], self.origins["test"] = carve(
                source[held], count, seed, held
            )
            if train is not None:
                self.splits["train"] = train
        elif train is not None:
            count = self.validation_count(checks.split_size(train))
            parts = carve(train, count, seed, "train")
            self.splits["validation"], self.splits["train"], self.origins["validation"] = parts[:3]
        if not self.splits:
            raise FileNotFoundError(
                f"{self.describe_source()} has no labelled split (found: {', '.join(source) or 'none'}). "
                f"{self.layouts_hint()}".strip()
            )

    def describe_split(self, split: str) -> str:
        """Where ``split``'s images come from, as a phrase (what search.py, analyze.py and evaluate.py print):
        ``the validation split (10,000 images of the validation split of ..., by search_split 10000 with seed 0;
        none of them in the test split)``."""
        held, positions = self.origins[split]
        size = f"{len(positions):,} images" if len(positions) < sys.maxsize // 2 else "a stream of images"
        where = f"the {held} split of {self.describe_source()}"
        if held == "train":
            return f"the {split} split ({size} of {where}, by val_size with seed {self.hparams.seed})"
        if self.hparams.search_split is None:
            return f"the {split} split (the {size} of {where})"
        other = "test" if split == "validation" else "validation"
        how = f"search_split {self.hparams.search_split} with seed {self.hparams.seed}"
        return f"the {split} split ({size} of {where}, by {how}; none of them in the {other} split)"

    def split_record(self, split: str, images: int) -> dict[str, Any]:
        """Which source images the first ``images`` of ``split`` are, with the settings that carve it: what a
        search's report keeps, for :meth:`searched_overlap`."""
        settings = {key: self.hparams.get(key) for key in ("seed", "val_size", "search_split")}
        return split_record(self.describe_source(), self.origins[split], images, settings)

    def searched_overlap(self, record: dict[str, Any], split: str = "test") -> int | None:
        """Images of ``split`` that a search recorded by :meth:`split_record` read (None: another source)."""
        return searched_overlap(record, self.describe_source(), self.origins[split])

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
        """The transform of one split's images (any image type in, a tensor in the model's mode out): timm's
        training or evaluation transform of :meth:`resolved_data_config`, or ``train_transform`` for training."""
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
            checks.check_input_size(
                getattr(module, "backbone", None), self.resolved_data_config()["input_size"], "data"
            )
        if not self.splits:
            self.prepare_splits()
        if module is not None:
            self.check_classes(getattr(module, "num_classes", 0))
        if stage == "fit" and "train" not in self.splits:
            raise UserError(
                f"{self.describe_source()} has no training split, which `fit` needs; it has only the held-out split, "
                f"which `test` (evaluate.py) reads. {self.layouts_hint()}".strip()
            )
        if stage == "validate" and "validation" not in self.splits:
            raise UserError(NO_VALIDATION.format(source=self.describe_source()))
        self._transforms = {split: self.make_transform(split == "train") for split in ("train", "validation", "test")}
        self._transforms["bank"] = self._transforms["test"]

    def check_split(self, split: str) -> None:
        """Refuse a ``split`` (``train``, ``validation``, ``test``, or ``bank``: the training images) that the
        prepared splits lack, before any image is read.

        Raises:
            UserError: naming the source and what it lacks.
        """
        needed = "train" if split == "bank" else split
        if split == "validation" and split not in self.splits:
            raise UserError(NO_VALIDATION.format(source=self.describe_source()))
        if needed not in self.splits:
            what = "held-out split (add a test/ or val/ folder)" if split == "test" else "training split"
            raise UserError(
                f"{type(self).__name__} has no {split!r} split: {self.describe_source()} has no {what}. "
                f"{self.layouts_hint()}".strip()
            )

    def _dataset(self, split: str) -> datasets.Dataset | datasets.IterableDataset:
        self.check_split(split)
        transform = self._transforms[split]

        def apply(batch: dict[str, list]) -> dict[str, list]:
            return {"image": [transform(image) for image in batch["image"]], "label": batch["label"]}

        data = self.splits["train" if split == "bank" else split]
        feature = data.features.get("image") if data.features is not None else None
        if isinstance(data, datasets.Dataset) and isinstance(feature, datasets.Image) and feature.decode:
            data = data.cast_column("image", datasets.Image(decode=False))  # decoded by _to_pil, naming the file
        if isinstance(data, datasets.IterableDataset):
            return data.map(apply, batched=True, batch_size=self.hparams.batch_size)
        return AugmentedSplit(data, transform) if split == "train" else data.with_transform(apply)

    def describe_source(self) -> str:
        """How error messages name the data source."""
        return type(self).__name__

    def _loader(self, split: str) -> DataLoader:
        data = self._dataset(split)
        streaming = isinstance(data, datasets.IterableDataset)
        batch = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size or self.hparams.batch_size
        generator = torch.Generator().manual_seed(self.hparams.seed)
        sampler = None
        world = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if split == "train" and not streaming:
            epoch, done = resume_point(self._position)
            sampler = EpochSampler(data, self.hparams.seed, *world, epoch=epoch, start=done * batch)
        elif split != "train" and not streaming and world[0] > 1:
            # Evaluate every image exactly once across processes: the default sampler pads the last shard with
            # repeated images, which changes the top-1 of a DDP run.
            sampler = UnrepeatedDistributedSampler(data, *world, shuffle=False)
        return DataLoader(
            data,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_images,
            generator=generator,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """What checkpoints keep of the data module: where training stands in its epoch, so that a run resumed from
        one goes on at the first batch not yet trained on (:func:`~attnprune.lit.data.sampling.training_position`)."""
        return training_position(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning calls it before any dataloader is made)."""
        self._position = dict(state_dict)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def for_model(self, model: torch.nn.Module) -> ImageDataModule:
        """Use ``model``'s preprocessing (its timm data config) unless a data config was given; returns self.

        Raises:
            ValueError: a given data config's ``input_size`` does not fit the model, or the data's classes do not fit
                its head (:meth:`check_classes`).
        """
        if self.hparams.data_config is None:
            self.hparams.data_config = resolve_model_data_config(model)
        checks.check_input_size(model, self.resolved_data_config()["input_size"], "data_config")
        self.check_classes(model.num_classes)
        return self

    def take(
        self, split: str, images: int | None, option: str = "images", default: int = 5000
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``images`` preprocessed images of ``split`` (None: ``default``, or all if fewer) as
        ``(images, labels)`` batches, in order.

        Raises:
            UserError: ``images`` given, and ``split`` holds fewer (``option`` names the count); before any is read
                (after, for a stream).
        """
        self.setup()
        self.check_split(split)
        asked, where = images, self.describe_split(split)
        images = checks.resolve_count(option, images, default, checks.split_size(self.splits[split]), where)
        loader = {"validation": self.val_dataloader, "test": self.test_dataloader}[split]()
        batches, seen = [], 0
        for x, y in loader:
            batches.append((x[: images - seen], y[: images - seen]))
            seen += len(batches[-1][1])
            if seen >= images:
                break
        if asked is not None:
            checks.check_count(option, images, seen, where)
        return batches

    def bank_dataloader(self) -> DataLoader:
        """The training split with evaluation transforms, in order (k-NN memory banks, feature statistics)."""
        return self._loader("bank")
