"""The data-parallel search: when ``torch.distributed`` is initialised (``torchrun``), each rank scores candidates on
its share of the images and the ranks exchange per-image values, so that every rank sees the same numbers and takes
the same decision at every step.

Shares are dealt as ``DistributedSampler`` deals them, without padding: rank ``r`` of ``W`` holds images ``r, r + W,
r + 2W, ...`` of a set (the searched images, the held-out images), so every image is scored exactly once and the first
``k`` images of a set (the beam's screening images) are spread over every rank. :meth:`Shard.gather` puts the ranks'
per-image values back in image order: the very vector one process computes (up to the last bits a different batch
composition can change), so every mean and the held-out check's paired test are taken over the same values.

Every user error of a distributed search is raised on every rank with the same message: the settings and the images
are the same on every rank, and what one rank alone sees (the state file, which rank 0 reads; non-finite outputs on
one rank's images) goes through :func:`agree`, which raises it on every rank as an
:class:`~attnprune.errors.AllRanksError`. The command lines print it once, on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from attnprune.errors import AllRanksError, UserError

__all__ = ["Shard", "agree", "on_first_rank", "share", "sum_over_ranks", "world"]

T = TypeVar("T")
Batches = list[tuple[Tensor, Tensor | None]]


def world() -> tuple[int, int]:
    """This process's rank and the number of ranks: ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Shard:
    """This rank's share of a set of ``total`` images: images ``rank, rank + size, rank + 2 size, ...``.

    Attributes:
        total: images in the whole set.
        rank: this process's rank.
        size: the number of ranks.
        offset: the position of the set's first image among the validation images (what messages call it).
    """

    total: int
    rank: int = 0
    size: int = 1
    offset: int = 0

    def count(self, first: int | None = None) -> int:
        """This rank's images among the first ``first`` of the set (all of it by default)."""
        first = self.total if first is None else min(first, self.total)
        return max(0, (first - self.rank + self.size - 1) // self.size)

    def position(self, local: int) -> int:
        """The position among the validation images of this rank's ``local``-th image."""
        return self.offset + self.rank + local * self.size

    def local(self, index: Tensor) -> Tensor:
        """Where this rank holds the images ``index`` of the set that are in its share (the others left out), in the
        order given."""
        return index[index % self.size == self.rank] // self.size

    def gather(self, values: Tensor, first: int | None = None) -> Tensor:
        """Every rank's ``values`` (a row per image of its share among the first ``first`` of the set, all by
        default) in image order, on every rank."""
        if self.size == 1:
            return values
        first = self.total if first is None else min(first, self.total)
        rows = -(-first // self.size)  # the largest share; the others are padded to it
        padded = values.new_zeros((rows, *values.shape[1:]))
        padded[: len(values)] = values
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.stack(parts, 1).flatten(0, 1)[:first]  # row j of rank r is image j * size + r


def share(batches: Batches, name: str, offset: int = 0, device: torch.device | None = None) -> tuple[Batches, Shard]:
    """This rank's share of the ``(images, labels)`` ``batches`` (the same on every rank), moved to ``device``, and
    its :class:`Shard`; one process keeps every batch as it is.

    Args:
        batches: the whole set, in order; labels may be None.
        name: what the set is, for the error (``searched``, ``held-out``).
        offset: the position of the set's first image among the validation images.
        device: where the share goes (None: where it is).

    Raises:
        UserError: fewer images than ranks.
    """
    rank, size = world()
    total = sum(len(images) for images, _ in batches)
    shard = Shard(total, rank, size, offset)
    if size > 1:
        if total < size:
            raise UserError(f"the {name} images ({total}) are fewer than the {size} ranks: each rank needs one")
        picked, seen = [], 0
        for images, labels in batches:
            start = (rank - seen) % size
            picked.append((images[start::size], None if labels is None else labels[start::size]))
            seen += len(images)
        batch = max(len(images) for images, _ in batches)
        images = torch.cat([x for x, _ in picked]).split(batch)
        labels = [y for _, y in picked]
        labels = torch.cat(labels).split(batch) if all(y is not None for y in labels) else [None] * len(images)
        batches = list(zip(images, labels, strict=True))
    if device is not None:
        batches = [(x.to(device), None if y is None else y.to(device)) for x, y in batches]
    return batches, shard


def agree(check: Callable[[], None]) -> None:
    """Run ``check`` on every rank; a user error it raises on any rank is raised on every rank (as an
    :class:`~attnprune.errors.AllRanksError` with the message of the first rank that raised one). One process raises
    the error itself."""
    rank, size = world()
    if size == 1:
        check()
        return
    error = None
    try:
        check()
    except UserError as raised:
        error = raised
    messages: list[str | None] = [None] * size
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [message for message in messages if message is not None]
    if failed:
        raise AllRanksError(failed[0], rank) from error


def on_first_rank(load: Callable[[], T]) -> T:
    """``load()`` run on rank 0 alone, its result (or its user error) given to every rank."""
    rank, size = world()
    if size == 1:
        return load()
    result: list = [None]

    def first() -> None:
        if rank == 0:
            result[0] = load()

    agree(first)
    dist.broadcast_object_list(result, src=0)
    return result[0]


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The sum of every rank's ``tensor``, added in rank order, so that every rank gets the very same bits."""
    _, size = world()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts).sum(0)
