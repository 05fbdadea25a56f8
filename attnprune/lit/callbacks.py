"""Lightning callbacks: per-layer attention selectivity logged during validation, and the model summary with
attnprune's FLOPs."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary, RichModelSummary
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from timm.models.vision_transformer import VisionTransformer

from attnprune.errors import UserError
from attnprune.flops import count_flops
from attnprune.selectivity import SelectivityAnalyzer

__all__ = ["FlopsModelSummary", "SelectivityCallback", "layer_key"]


def layer_key(layer: int, depth: int) -> str:
    """``layer_<i>`` with ``i`` zero-padded to the depth's width, so keys sort by layer (``layer_02`` before
    ``layer_10``)."""
    return f"layer_{layer:0{len(str(max(depth - 1, 0)))}d}"


class FlopsModelSummary(RichModelSummary if _RICH_AVAILABLE else ModelSummary):
    """Lightning's model summary (the rich one where rich is installed, as Lightning chooses) with attnprune's FLOPs
    of the module's ``backbone`` ViT (:func:`attnprune.count_flops`: per image at its input size, one
    multiply-accumulate = one FLOP, under its routing) in the row of the submodule that holds it and in the total,
    instead of the zeros Lightning shows without an example input. Every attnprune module has a ``backbone``: the
    classifiers' and probes' network, the pretraining modules' student or encoder."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone = getattr(pl_module, "backbone", None)
        self.flops, self.row = None, None
        if isinstance(backbone, VisionTransformer):
            self.flops = count_flops(backbone)
            self.row = next(name for name, child in pl_module.named_children() if backbone in child.modules())
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data: list, *args: Any, total_flops: int, **kwargs: Any) -> None:
        if self.flops is not None:
            columns = dict(summary_data)
            flops = get_human_readable_count(self.flops)
            columns["FLOPs"] = [flops if name == self.row else "-" for name in columns["Name"]]
            summary_data, total_flops = list(columns.items()), self.flops
        super().summarize(summary_data, *args, total_flops=total_flops, **kwargs)


class SelectivityCallback(Callback):
    """Measures attention selectivity on a subset of the validation images and logs it per layer.

    Keys are ``selectivity/<metric>/layer_<i>`` in every logger (``i`` zero-padded to the depth's width, so they sort
    by layer); with W&B, also a table ``selectivity/table`` (one row
    per layer) and, with the oracle, a line plot of scorer reliability against depth. Values are aggregated across
    DDP ranks.

    The default measures the concentration and stability metrics (three forwards with attention materialised: clean,
    noisy and mirrored inputs, plus the metrics), which costs about as much as evaluating three to six images per
    analysed image (DeiT-T, ``benchmarks/results/selectivity_cost.json``). So it analyses at most ``max_fraction``
    of the epoch's validation images (and at most ``max_images``): about one validation epoch, or much less on a
    large validation split. The scorer-reliability metrics need the leave-one-out oracle (``oracle=True``), which runs
    every token removal of every image through the rest of the network (``depth x tokens`` partial forwards per
    image): give it a few images and a large ``every_n_epochs``.

    Args:
        max_images: validation images analysed per epoch at most (the first ones, per process).
        max_fraction: at most this fraction of the epoch's validation images (None: ``max_images`` alone).
        oracle: also measure scorer reliability against the leave-one-out oracle (costly).
        scorers: scorers whose reliability is measured (default: all registered; only with the oracle).
        keep: fraction of tokens of the top-k overlap.
        every_n_epochs: analyse every n-th validation epoch.
        max_batches: at most this many validation batches too (None: no limit besides ``max_images``).
    """

    def __init__(
        self,
        max_images: int = 64,
        max_fraction: float | None = 0.15,
        oracle: bool = False,
        scorers: list[str] | None = None,
        keep: float = 0.5,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
    ) -> None:
        if max_images < 1 or every_n_epochs < 1:
            raise UserError(f"max_images and every_n_epochs must be >= 1, got {max_images} and {every_n_epochs}")
        self.max_images, self.oracle, self.scorers, self.keep = max_images, oracle, scorers, keep
        if max_fraction is not None and not 0.0 < max_fraction <= 1.0:
            raise UserError(f"max_fraction must be in (0, 1], got {max_fraction}")
        self.every_n_epochs, self.max_batches, self.max_fraction = every_n_epochs, max_batches, max_fraction
        self.limit = max_images
        self.analyzer: SelectivityAnalyzer | None = None
        self.seen = 0
        self.seconds = 0.0

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen, self.seconds, self.limit = 0, 0.0, self.max_images
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
        if not self._active(trainer):
            return
        if batch_idx == 0 and self.max_fraction is not None:  # the epoch's images, from its batch count and size
            epoch_images = trainer.num_val_batches[dataloader_idx] * len(batch[0])
            if math.isfinite(epoch_images):  # a streamed split has no known length: max_images alone
                self.limit = min(self.max_images, max(1, math.ceil(self.max_fraction * epoch_images)))
        if self.seen >= self.limit or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        images = batch[0][: self.limit - self.seen]
        start = time.perf_counter()
        with torch.no_grad():
            self.analyzer.update(pl_module.backbone, images)
        self.seconds += time.perf_counter() - start
        self.seen += len(images)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or self.analyzer is None:
            return
        results = self.analyzer.compute()
        self.analyzer.reset()
        pl_module.log("selectivity/seconds", self.seconds)
        pl_module.log("selectivity/images", float(self.seen))  # per process
        for metric, values in results.items():
            for layer, value in enumerate(values):
                if not math.isnan(value):
                    pl_module.log(f"selectivity/{metric}/{layer_key(layer, len(values))}", value)
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
