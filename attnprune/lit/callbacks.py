"""Lightning callbacks: per-layer attention selectivity logged during validation."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from attnprune.selectivity import SelectivityAnalyzer

__all__ = ["SelectivityCallback"]


class SelectivityCallback(Callback):
    """Measures attention selectivity on the first validation batches and logs it per layer.

    Keys are ``selectivity/<metric>/layer_<i>`` in every logger; with W&B, also a table ``selectivity/table`` (one row
    per layer) and a line plot per metric group against depth. Values are aggregated across DDP ranks.

    Args:
        max_batches: validation batches analysed per epoch (the oracle runs every token removal of each image).
        oracle: measure scorer reliability against the leave-one-out oracle.
        scorers: scorers whose reliability is measured (default: all registered).
        keep: fraction of tokens of the top-k overlap.
        every_n_epochs: analyse every n-th validation epoch.
    """

    def __init__(
        self,
        max_batches: int = 2,
        oracle: bool = True,
        scorers: list[str] | None = None,
        keep: float = 0.5,
        every_n_epochs: int = 1,
    ) -> None:
        self.max_batches, self.oracle, self.scorers, self.keep = max_batches, oracle, scorers, keep
        self.every_n_epochs = every_n_epochs
        self.analyzer: SelectivityAnalyzer | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer) and self.analyzer is None:
            backbone = pl_module.backbone
            self.analyzer = SelectivityAnalyzer(
                len(backbone.blocks), backbone.has_class_token, self.scorers, self.oracle, self.keep
            ).to(pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active(trainer) and batch_idx < self.max_batches:
            with torch.no_grad():
                self.analyzer.update(pl_module.backbone, batch[0])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or self.analyzer is None:
            return
        results = self.analyzer.compute()
        self.analyzer.reset()
        for metric, values in results.items():
            for layer, value in enumerate(values):
                if not math.isnan(value):
                    pl_module.log(f"selectivity/{metric}/layer_{layer}", value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    self._log_wandb(logger, results)

    @staticmethod
    def _log_wandb(logger: WandbLogger, results: dict[str, list[float]]) -> None:
        import wandb

        metrics = sorted(results)
        depth = len(next(iter(results.values())))
        rows = [[layer, *(results[m][layer] for m in metrics)] for layer in range(depth)]
        logger.log_table("selectivity/table", columns=["layer", *metrics], data=rows)
        reliability = [m for m in metrics if m.startswith("reliability_spearman_")]
        if reliability:
            plot = wandb.plot.line_series(
                xs=list(range(depth)),
                ys=[results[m] for m in reliability],
                keys=[m.removeprefix("reliability_spearman_") for m in reliability],
                title="scorer reliability (Spearman with the oracle)",
                xname="layer",
            )
            logger.experiment.log({"selectivity/reliability": plot})
