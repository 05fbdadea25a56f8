"""The training split's order and augmentations, drawn so that a resumed run draws them again exactly.

An epoch's order is a permutation seeded by the data module's ``seed`` and the epoch, and each image is augmented
under a seed drawn with it (:class:`EpochSampler` yields ``(index, seed)`` keys, :class:`AugmentedSplit` reads them),
so neither depends on earlier epochs, on the process's random state or on which DataLoader worker loads the image.
The data module saves where training stands in its epoch in every checkpoint (:func:`training_position`); a run
resumed from it starts the epoch's order at the first batch not yet trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import datasets
import lightning as L
import numpy as np
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import Dataset, DistributedSampler

from attnprune.lit.seeding import seeded_rngs

__all__ = ["AugmentedSplit", "EpochSampler", "resume_point", "training_position"]


class EpochSampler(DistributedSampler):
    """This process's share of each epoch's order, as ``(index, augmentation seed)`` keys.

    The order is a permutation of the split drawn from ``(seed, epoch)`` (padded and dealt to the processes as torch's
    ``DistributedSampler`` does, which Lightning therefore leaves in place under DDP); each index comes with the seed
    its augmentation is drawn under. Lightning sets the epoch (``set_epoch``). ``start`` skips the first ``start``
    keys of epoch ``epoch``'s first pass: a run resumed mid-epoch goes on where the checkpoint left it.

    Args:
        dataset: the training split.
        seed: the seed of the order and of the augmentations.
        num_replicas: processes the epoch is dealt to.
        rank: this process's rank.
        epoch: the first epoch drawn.
        start: keys of that epoch already trained on (by this process).
    """

    def __init__(
        self, dataset: Any, seed: int, num_replicas: int = 1, rank: int = 0, epoch: int = 0, start: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.epoch = epoch
        self._skip = (epoch, start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])
        order = rng.permutation(len(self.dataset))
        seeds = rng.integers(2**63, size=len(self.dataset))
        order = np.resize(order, self.total_size)  # padded with the first indices, as DistributedSampler pads
        mine = order[self.rank : self.total_size : self.num_replicas]
        epoch, start = self._skip
        if epoch == self.epoch and start:
            mine, self._skip = mine[start:], (epoch, 0)
        return iter([(int(index), int(seeds[index])) for index in mine])


class AugmentedSplit(Dataset):
    """A training split read by :class:`EpochSampler`'s ``(index, seed)`` keys: each image transformed under its own
    seed (:func:`~attnprune.lit.seeding.seeded_rngs`), so its augmentation is the same in any process or worker.

    Args:
        data: the split's rows (``image``, ``label``).
        transform: the training transform of one image.
    """

    def __init__(self, data: datasets.Dataset, transform: Callable[[Any], Any]) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        rows = self.data[[index for index, _ in keys]]  # one read of the batch's rows
        examples = []
        for image, label, (_, seed) in zip(rows["image"], rows["label"], keys, strict=True):
            with seeded_rngs(seed):
                examples.append({"image": self.transform(image), "label": label})
        return examples


def training_position(trainer: L.Trainer | None) -> dict[str, Any]:
    """Where a fitting ``trainer`` stands: its epoch, the batches of it trained on, the batches the epoch has (what a
    data module saves in a checkpoint; empty outside ``fit``)."""
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return {}
    return {
        "epoch": trainer.current_epoch,
        "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        "epoch_batches": trainer.num_training_batches,
    }


def resume_point(position: dict[str, Any]) -> tuple[int, int]:
    """The epoch a run resumed at ``position`` (:func:`training_position`) goes on with, and the batches of it done."""
    if not position:
        return 0, 0
    epoch, done = position["epoch"], position["batches"]
    return (epoch + 1, 0) if done >= position["epoch_batches"] else (epoch, done)
