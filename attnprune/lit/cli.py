"""The LightningCLI behind ``train.py`` and ``evaluate.py``: YAML configs, W&B by default (offline without an API
key), checkpoints (``last.ckpt`` for ``--ckpt_path`` resuming), learning-rate monitor and progress bar."""

from __future__ import annotations

import netrc
import os
from typing import Any

import lightning as L
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger

__all__ = ["AttnpruneCLI", "wandb_offline", "trainer_defaults"]


def wandb_offline() -> bool:
    """True unless W&B can log online: an API key in ``WANDB_API_KEY`` or ``~/.netrc`` and no ``WANDB_MODE=offline``.

    No network probe is made: with a key but no network, set ``WANDB_MODE=offline``.
    """
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def trainer_defaults(project: str = "attnprune") -> dict[str, Any]:
    """Trainer defaults of the entry points; every one can be overridden in YAML or on the command line."""
    return {
        "logger": lazy_instance(WandbLogger, project=project, save_dir="runs", offline=wandb_offline()),
    }


class AttnpruneCLI(LightningCLI):
    """LightningCLI over any of attnprune's LightningModules and DataModules (``class_path`` / ``init_args``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Checkpointing (``--checkpoint.*``, keeps ``last.ckpt`` for resuming) and a learning-rate monitor."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
