"""Learning-rate schedules shared by every LightningModule: linear warm-up, then cosine decay, stepped per step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from attnprune.errors import UserError

__all__ = ["cosine", "steps_per_epoch", "warmup_cosine"]


def cosine(step: float, total: float, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total`` and after)."""
    progress = min(step / total, 1.0) if math.isfinite(total) and total > 0 else 0.0
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps per epoch (gradient accumulation included)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        trainer.fit_loop.setup_data()  # what Trainer.estimated_stepping_batches does when the loader is not set up
        batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise UserError("warmup_epochs needs a train dataloader with a length; set warmup_epochs=0")
    return math.ceil(batches / trainer.accumulate_grad_batches)


def warmup_cosine(optimizer: torch.optim.Optimizer, trainer: L.Trainer, warmup_epochs: float) -> dict[str, Any]:
    """``configure_optimizers``' return value: ``optimizer`` with linear warm-up over ``warmup_epochs``, then cosine
    decay to zero at the end of training, stepped every optimizer step."""
    total = trainer.estimated_stepping_batches
    warmup = round(warmup_epochs * steps_per_epoch(trainer)) if warmup_epochs > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return cosine(step - warmup, total - warmup, 1.0, 0.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
