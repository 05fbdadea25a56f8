"""Resuming a training where it stopped: ``last.ckpt`` kept current, and the CSV logs carried on in their folder.

Together with the seeded order, augmentations and training steps (:mod:`attnprune.lit.seeding`), a run killed at any
step and resumed with ``--ckpt_path .../last.ckpt`` ends with the weights, optimizer state and logged metrics of a run
never interrupted (deterministic mode, on the CPU; ``tests/test_resume.py``).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from attnprune.atomic import atomic_path
from attnprune.errors import UserError

__all__ = ["ContinuedCSVWriter", "LatestCheckpoint", "continue_csv_logs"]


class LatestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` (``save_last=True``) holds the latest state: rewritten at
    every epoch end, and every ``last_every_n_steps`` optimizer steps.

    Since Lightning 2.6, ``last.ckpt`` is rewritten only when a top-k checkpoint is saved, that is when the
    monitored metric improves, so resuming from it can go back several epochs. Here it is also written at every
    epoch end where no top-k checkpoint was (at the end of validation, or of the training epoch when validation does
    not run every epoch, as Lightning decides where to save), and within epochs every ``last_every_n_steps`` steps,
    so a killed run loses at most that many steps. ``save_last='link'`` keeps Lightning's behaviour.

    Args:
        last_every_n_steps: also rewrite ``last.ckpt`` every this many optimizer steps (0: at epoch ends only).
        **kwargs: Lightning's ``ModelCheckpoint`` arguments.
    """

    def __init__(self, last_every_n_steps: int = 0, **kwargs: Any) -> None:
        if last_every_n_steps < 0:
            raise UserError(
                f"checkpoint.last_every_n_steps must be >= 0 (0: at epoch ends only), got {last_every_n_steps}"
            )
        super().__init__(**kwargs)
        self.last_every_n_steps = last_every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self.last_every_n_steps and trainer.global_step % self.last_every_n_steps == 0:
            self._save_last_if_stale(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_at = (trainer.current_epoch, trainer.global_step)

    def _save_last_if_stale(self, trainer: L.Trainer) -> None:
        if self.save_last is not True or self._should_skip_saving_checkpoint(trainer):
            return
        if getattr(self, "_last_saved_at", None) != (trainer.current_epoch, trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ContinuedCSVWriter(ExperimentWriter):
    """The CSV logger's writer for a run resumed in its version folder: it keeps that folder's ``metrics.csv``
    (Lightning's writer deletes it) and, once the run is restored, the rows logged before the checkpoint
    (:meth:`keep_before`)."""

    def _check_log_dir_exists(self) -> None:
        """Keep the folder's files: they are the run's logs so far."""

    def keep_before(self, step: int) -> None:
        """Drop the rows of ``metrics.csv`` logged at ``step`` or later (after the checkpoint: the resumed run logs
        them again) and go on with its columns."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), list(reader.fieldnames or [])
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(row for row in rows if int(row["step"]) < step)
        self.metrics_keys = columns  # what the run logs next is appended under them (new keys rewrite the header)


class _KeepLoggedBefore(Callback):
    """At the start of the resumed training, the continued CSV writers keep the rows logged before its step."""

    def __init__(self, writers: list[ContinuedCSVWriter]) -> None:
        self.writers = writers

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for writer in self.writers:
            writer.keep_before(trainer.global_step)


def continue_csv_logs(trainer: L.Trainer, ckpt_path: str | Path) -> set[Path]:
    """Resuming from ``ckpt_path``, log on in the version folder it was saved in: every CSV logger whose folder holds
    it (``<save_dir>/<name>/version_<n>/checkpoints/``; a logger without a version given takes ``n``) keeps that
    folder's ``metrics.csv`` up to the checkpoint's step and appends to it.

    Returns:
        The version folders continued (the run's own before it starts: a failed resume must not remove them).
    """
    run_dir = Path(ckpt_path).absolute().parent.parent
    writers, folders = [], set()
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or logger._experiment is not None:
            continue
        if logger._version is None and run_dir.parent == Path(logger.root_dir).absolute():
            number = re.fullmatch(r"version_(\d+)", run_dir.name)
            logger._version = int(number[1]) if number else run_dir.name
        if Path(logger.log_dir).absolute() == run_dir and run_dir.is_dir() and trainer.is_global_zero:
            logger._experiment = ContinuedCSVWriter(logger.log_dir)
            writers.append(logger._experiment)
            folders.add(run_dir)
    if writers:
        trainer.callbacks.append(_KeepLoggedBefore(writers))
    return folders
