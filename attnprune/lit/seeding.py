"""Randomness a resumed training draws again exactly.

A run killed mid-training and resumed from its checkpoint must end with the weights of a run never interrupted. So no
random draw of training depends on how many draws came before it: each is seeded by where it happens.

- The order of an epoch's images and each image's augmentation are seeded by the data module's ``seed``, the epoch
  and the image (:class:`~attnprune.lit.data.sampling.EpochSampler`), in whichever process or worker runs it.
- What a training step draws itself (dropout, drop-path, mixup/cutmix, MAE's masks) is seeded by the run's seed, the
  epoch and the batch (:class:`SeededBatches`, which ``train.py`` adds).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["SeededBatches", "derive_seed", "seeded_rngs"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed drawn from ``keys`` (numpy's ``SeedSequence``: nearby keys give unrelated seeds)."""
    return int(np.random.SeedSequence([key % 2**64 for key in keys]).generate_state(1, np.uint64)[0] >> 1)


def _seed_host_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU random generators seeded by ``seed`` inside the block and restored after it:
    what the block draws depends on ``seed`` alone, and draws outside it are not moved."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    _seed_host_rngs(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededBatches(Callback):
    """Seeds Python's, numpy's and torch's generators (every device's) before each training batch from the seed, the
    epoch and the batch index, so a training step draws the same dropout, drop-path, mixup/cutmix and masks however
    the run got to it: in one go, or resumed from a checkpoint.

    Args:
        seed: the seed; None: the run's (``seed_everything``, which ``train.py`` sets to 0 unless given), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        step_seed = derive_seed(seed, trainer.current_epoch, batch_idx)
        _seed_host_rngs(step_seed)
        torch.manual_seed(step_seed)  # the accelerators' generators too (dropout on a GPU)
