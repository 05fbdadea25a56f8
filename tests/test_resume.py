"""Exact resume: a training killed at any step and resumed from its ``last.ckpt`` ends with the weights, optimizer state
and logged metrics of a run never interrupted (deterministic mode, CPU), its logs carried on in the same folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from attnprune.cli.train import main as train
from attnprune.lit.data.sampling import EpochSampler
from tests.conftest import TINY_BACKBONE, make_image_folder

# 30 training images in batches of 8: 4 steps an epoch (the last one of 6 images), 2 epochs
EPOCHS, STEPS_PER_EPOCH = 2, 4


class KillAt(Callback):
    """Kills the run (an exception) as training step ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), train_per_class=12, test_per_class=2)


def fit(images: Path, folder: Path, kill: int | None = None, resume: Path | None = None) -> None:
    """``train.py fit`` of a depth-2, width-32 classifier with every source of randomness on (augmentation, mixup and
    cutmix, drop-path), a CSV logger under ``folder``, ``last.ckpt`` every 3 steps."""
    backbone = dict(TINY_BACKBONE, model_kwargs={**TINY_BACKBONE["model_kwargs"], "depth": 2, "drop_path_rate": 0.2})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "deterministic": True,
            "max_epochs": EPOCHS,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}},
            "callbacks": [] if kill is None else [{"class_path": f"{__name__}.KillAt", "init_args": {"step": kill}}],
        },
        "checkpoint": {"last_every_n_steps": 3},
        "model": {
            "class_path": "attnprune.lit.modules.PrunedClassifier",
            "init_args": {
                "backbone": backbone,
                "mixup": 0.4,
                "cutmix": 0.4,
                "label_smoothing": 0.1,
                "warmup_epochs": 1,
            },
        },
        "data": {
            "class_path": "attnprune.lit.data.ImageFolderDataModule",
            "init_args": {"root": str(images), "batch_size": 8, "val_size": 6, "cache_dir": str(folder / "cache")},
        },
    }
    path = folder.parent / f"{folder.name}-{kill}.yaml"
    path.write_text(yaml.safe_dump(config))
    train(["fit", "--config", str(path), *(["--ckpt_path", str(resume)] if resume else [])])


def test_a_killed_training_resumes_to_the_same_weights_and_logs(images, tmp_path):
    fit(images, tmp_path / "whole")
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    # killed mid-epoch 0 (last.ckpt of step 3), at the first step of epoch 1 (last.ckpt of epoch 0's end, step 4) and
    # mid-epoch 1 (step 6); each time resumed from last.ckpt
    for kill, saved_at in ((3, 3), (5, 4), (7, 6)):
        with pytest.raises(RuntimeError, match=f"killed at step {kill}"):
            fit(images, tmp_path / "killed", kill=kill, resume=last if last.is_file() else None)
        assert torch.load(last, weights_only=False)["global_step"] == saved_at
    fit(images, tmp_path / "killed", resume=last)

    whole = torch.load(tmp_path / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == whole["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert resumed["state_dict"].keys() == whole["state_dict"].keys()
    for name, weight in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], weight), name
    (optimizer,), (resumed_optimizer,) = whole["optimizer_states"], resumed["optimizer_states"]
    assert resumed_optimizer["param_groups"] == optimizer["param_groups"]
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_optimizer["state"][index][key], value), (index, key)
    assert resumed["lr_schedulers"] == whole["lr_schedulers"]

    # the logs went on in the killed run's folder, with exactly the rows of the uninterrupted run
    assert [p.name for p in (tmp_path / "killed").iterdir()] == ["version_0"]
    metrics = (tmp_path / "whole" / "version_0" / "metrics.csv").read_text()
    assert (tmp_path / "killed" / "version_0" / "metrics.csv").read_text() == metrics
    # the header, a learning-rate row and a loss row a step, a validation row an epoch
    assert metrics.count("\n") == 1 + EPOCHS * (2 * STEPS_PER_EPOCH + 1)


def test_an_epoch_draws_the_same_order_and_augmentations_however_it_is_reached():
    """Each epoch's keys depend on the seed and the epoch alone; a start skips the keys already trained on; under DDP
    the processes share the epoch's keys out between them."""
    data = list(range(10))
    first = EpochSampler(data, seed=3)
    first.set_epoch(0), list(first)
    first.set_epoch(1)
    again = EpochSampler(data, seed=3, epoch=1)
    assert list(first) == list(again)
    indices = [index for index, _ in again]
    assert sorted(indices) == data and indices != [index for index, _ in EpochSampler(data, seed=3)]
    assert list(EpochSampler(data, seed=3, epoch=1, start=4)) == list(again)[4:]
    shares = [list(EpochSampler(data, seed=3, num_replicas=2, rank=rank, epoch=1)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(again)
    seeds = np.array([seed for _, seed in again])
    assert len(set(seeds.tolist())) == len(data)  # every image its own augmentation seed
