"""What the data must share with the model, checked before any image is read: an input size the model takes, and
labels its head has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import pyarrow.compute as pc
import torch

from attnprune.errors import UserError, check_number
from attnprune.routing.core import MAX_SEED

__all__ = [
    "SETTINGS",
    "check_settings",
    "check_count",
    "check_input_size",
    "check_labels",
    "labelled",
    "resolve_count",
    "split_size",
    "top_label",
]


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


SETTINGS: dict[str, dict[str, Any]] = {
    "batch_size": {"low": 1, "integer": True},
    "eval_batch_size": {"low": 1, "integer": True},
    "num_workers": {"low": 0, "integer": True},
    "seed": {"low": 0, "high": MAX_SEED, "integer": True},
    "hflip": {"low": 0, "high": 1},
}
"""The range of each data module setting of that name (None, where a setting may be None, is left to the module)."""


def check_settings(owner: str, settings: Mapping[str, Any]) -> None:
    """Refuse a data module's settings outside their range (:data:`SETTINGS`; ``train_scale`` a pair ``low <= high``
    in (0, 1]), before any data is read.

    Raises:
        UserError: ``<module> <setting> must be <range>, got <value>``.
    """
    for name, bounds in SETTINGS.items():
        if settings.get(name) is not None:
            check_number(f"{owner} {name}", settings[name], **bounds)
    scale = settings.get("train_scale")
    pair = (
        isinstance(scale, (tuple, list))
        and len(scale) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
    )
    if scale is not None and not (pair and 0 < scale[0] <= scale[1] <= 1):
        raise UserError(
            f"{owner} train_scale must be (low, high) with 0 < low <= high <= 1 (RandomResizedCrop's fractions of the "
            f"image area), got {scale!r}"
        )


def check_labels(splits: dict[str, Any], classes: int, source: str, by_folder_names: bool) -> None:
    """Refuse labels a head of ``classes`` classes cannot be scored on (0: a headless model, whose labels go unused):
    a label beyond the head, or fewer classes than the head has when they are labelled by their sorted folder names
    alone (``by_folder_names``), which need not be the model's first classes.

    Args:
        splits: the data module's splits (``datasets`` with a ``label`` ``ClassLabel``).
        classes: the head's classes.
        source: the data, as the messages name it.
        by_folder_names: the labels are the positions of sorted class folder names, which no class map gave.

    Raises:
        UserError: naming the source and both class counts.
    """
    if not classes or not splits:
        return
    top = max(top_label(split) for split in splits.values())
    if top >= classes:
        raise UserError(
            f"{source} has labels up to {top} but the model's head has {classes} classes (0 to {classes - 1}): labels "
            f"{classes} to {top} are beyond it"
        )
    found = next(iter(splits.values())).features["label"].num_classes
    if found < classes and by_folder_names:
        raise UserError(
            f"{source} has {found} classes but the model's head has {classes}, and no class_map says which of the "
            f"model's classes they are (sorted folder names would be labels 0 to {found - 1}); give class_map: a .txt "
            "file of one class per line or a .json file of folder name -> label"
        )


def top_label(data: datasets.Dataset | datasets.IterableDataset) -> int:
    """The largest label of a split (-1 for none), or of its ``ClassLabel`` when streamed."""
    if not isinstance(data, datasets.Dataset):
        return data.features["label"].num_classes - 1
    top = pc.max(data.data.column("label")).as_py() if len(data) else None
    return -1 if top is None else top


def resolve_count(option: str, images: int | None, default: int, available: int | None, where: str) -> int:
    """The images to read of a split holding ``available`` (None: a stream): ``images`` as asked, refused above what
    the split holds (:func:`check_count`), or without a count the ``default``, as many as the split holds up to it."""
    if images is None:
        return default if available is None else min(default, available)
    check_count(option, images, available, where)
    return images


def check_count(option: str, images: int, available: int | None, where: str) -> None:
    """Refuse a count of images (``option``) above the ``available`` images of a split (None: a stream, unknown).

    Raises:
        UserError: naming the option, both counts and the split (``where``), instead of taking fewer silently.
    """
    if available is not None and images > available:
        raise UserError(f"{option} is {images:,} but {where} holds {available:,}; give at most {available:,}")


def split_size(data: datasets.Dataset | datasets.IterableDataset) -> int | None:
    """The images of a split; None for a stream."""
    return None if isinstance(data, datasets.IterableDataset) else len(data)


def labelled(data: datasets.Dataset | datasets.IterableDataset) -> bool:
    """False for a split whose labels are all -1 (the hub's ImageNet test split)."""
    return not isinstance(data, datasets.Dataset) or len(data) == 0 or top_label(data) >= 0
