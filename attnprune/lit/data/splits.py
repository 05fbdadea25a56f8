"""The split protocol: how many images a carve-out takes, the seeded carve-out of a search split from a held-out
split (val-only ImageNet), and the record of which source images a split holds, so that evaluate.py can refuse to
report on images a search saw.

A split's *origin* is the source split it was taken from and the positions of its images there, in the split's order
(``("validation", [17, 3, ...])``); positions are what two runs on the same source and seed agree on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from attnprune.errors import UserError

__all__ = ["Origin", "carve", "disjoint_draws", "searched_overlap", "split_count", "split_record"]

Origin = tuple[str, Sequence[int]]  # (source split, positions of the split's images in it)


def split_count(size: int | float, total: int | None, name: str, source: str) -> int:
    """Images a carve-out of ``size`` (a count, or a fraction of ``total``) takes out of ``total``, with at least one
    image left on each side.

    Args:
        size: an image count, or a fraction in (0, 1).
        total: images of the split carved from; None when unknown (streaming), which needs a count.
        name: the option's name in error messages (``val_size``, ``search_split``).
        source: how error messages name the images carved from (``training images of <source>``).

    Raises:
        UserError: a fraction outside (0, 1), a fraction of a stream, or a count that leaves a side empty.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise UserError(f"{name} must be an image count or a fraction, got {size!r}")
    if total is None:
        if not isinstance(size, int) or size < 1:
            raise UserError(f"{name} must be an image count (>= 1) with streaming data, got {size!r}")
        return size
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise UserError(f"{name} as a fraction must be in (0, 1), got {size}")
        count = math.ceil(size * total)
    else:
        count = size
    if not 1 <= count < total:
        raise UserError(
            f"{name}={size!r} holds out {count} of the {total} {source}; at least one image must stay on "
            f"each side. Give a smaller count or a fraction ({name}=0.1)"
        )
    return count


def carve(
    data: datasets.Dataset | datasets.IterableDataset, count: int, seed: int, name: str
) -> tuple[Any, Any, Origin, Origin]:
    """Split ``data`` (the source split ``name``) into ``count`` images taken out and the rest, disjoint, both in the
    order of a permutation seeded by ``seed`` (``datasets``' ``train_test_split``: the taken part is its ``test``
    part), so any prefix of either is a uniform sample. A stream gives its first ``count`` images to the taken part.

    Returns:
        The taken part, the rest, and the origin of each.
    """
    if isinstance(data, datasets.IterableDataset):
        return data.take(count), data.skip(count), (name, range(count)), (name, range(count, sys.maxsize))
    order = np.random.default_rng(seed).permutation(len(data)).tolist()
    taken, rest = order[:count], order[count:]
    return data.select(taken), data.select(rest), (name, taken), (name, rest)


def split_record(source: str, origin: Origin, images: int, settings: dict[str, Any]) -> dict[str, Any]:
    """What a search's report keeps of the images it read: the first ``images`` of a split of ``origin``.

    Args:
        source: how the data module names its source (``describe_source``).
        origin: the split's origin.
        images: images read from the split's start.
        settings: the data settings that reproduce the split (``seed``, ``search_split``, ``val_size``).
    """
    split, positions = origin
    return {"source": source, "split": split, **settings, "positions": list(positions[:images])}


def searched_overlap(record: dict[str, Any], source: str, origin: Origin) -> int | None:
    """Images of a split of ``origin`` (on ``source``) that the search of ``record`` (:func:`split_record`) read;
    None when the record is of another source, which positions cannot be compared with."""
    if record.get("source") != source:
        return None
    split, positions = origin
    if record.get("split") != split:
        return 0
    held = positions if isinstance(positions, range) else set(positions)
    return sum(position in held for position in record.get("positions", []))


def disjoint_draws(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    images: int,
    seeds: list[int],
    batch_size: int,
    permutation_seed: int = 20261128,
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Disjoint draws of ``images`` images of ``batches``, one per seed (draw ``s`` holds positions ``s * images`` to
    ``(s + 1) * images - 1`` of one fixed permutation), as batches of ``batch_size``: the benchmarks' repeated
    searches on validation images, each on images the others do not see."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    if images * (max(seeds) + 1) > len(y):
        raise UserError(f"{max(seeds) + 1} draws of {images} images exceed the {len(y)} images there are")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(permutation_seed))
    cuts = {seed: order[seed * images : (seed + 1) * images] for seed in seeds}
    return {seed: [(x[i], y[i]) for i in cut.split(batch_size)] for seed, cut in cuts.items()}
