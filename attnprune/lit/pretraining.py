"""The LightningModules that pretrain the offline DINO and MAE paradigm models.

- :class:`DINOPretraining`: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised
  Vision Transformers", ICCV 2021). A student ViT matches, across crops of one image, the centred and sharpened
  output of a teacher whose weights are an exponential moving average (EMA) of the student's.
- :class:`MAEPretraining`: masked autoencoding (He et al., "Masked Autoencoders Are Scalable Vision Learners",
  CVPR 2022). The encoder sees a random 25% of the patches; a light decoder reconstructs the pixels of the rest.

Both train a plain timm ``VisionTransformer`` and hand it over with ``backbone_state_dict()``, which loads strictly
into ``timm.create_model(model, num_classes=0, **model_kwargs)``, and with ``save_backbone(path)`` (also run at the end
of ``fit`` when ``backbone_path`` is set), a safetensors file that :func:`attnprune.load_model` rebuilds alone and
that the downstream modules take as their backbone's ``checkpoint``: the DINO teacher for
:class:`~attnprune.lit.modules.LinearProbe` and :class:`~attnprune.lit.modules.KNNClassifier`, the MAE encoder for
:class:`~attnprune.lit.modules.PrunedClassifier` with ``paradigm="mae"``. The models and losses are plain torch in
:mod:`attnprune.pretrain`; these modules wire them to optimisers, schedules and logging.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from attnprune.errors import UserError
from attnprune.lit.optim import ConfigurableOptimizers, adamw_warmup_cosine, cosine
from attnprune.paradigms import PARADIGMS
from attnprune.pretrain import (
    DINOHead,
    DINONetwork,
    MaskedAutoencoder,
    create_vit,
    dino_loss,
    dino_teacher_targets,
    ema_update,
    export_backbone,
    finetuning_state_dict,
    update_center,
)

__all__ = ["DINOPretraining", "MAEPretraining"]

_NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token")


def _decay_groups(params: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: decayed, and not (biases, norms, position embeddings and special tokens)."""
    decay, no_decay = [], []
    for name, p in params.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_WEIGHT_DECAY
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _detached_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def _save_backbone(state: dict[str, Tensor], path: str | Path, hparams: Any, paradigm: str, kwargs: dict) -> Path:
    """Write the pretrained backbone (:func:`attnprune.pretrain.export_backbone`) and say where."""
    path = export_backbone(state, path, hparams.model, paradigm, kwargs, hparams.pretrained_cfg)
    rank_zero_info(f"wrote the {paradigm} backbone to {path}")
    return path


class DINOPretraining(ConfigurableOptimizers, L.LightningModule):
    """DINO self-distillation of a timm ViT.

    Batches are ``(crops, labels)`` with ``crops`` a list ``[global1, global2, local1, ...]`` of ``[B, C, H, W]``
    tensors (an :class:`~attnprune.lit.data.ImageDataModule` with a
    :class:`~attnprune.pretrain.MultiCropTransform` as ``train_transform`` yields them); labels are
    ignored. The teacher sees the two global crops, the student all crops. The teacher is updated by EMA right after
    every optimizer step, with a momentum rising from ``ema_momentum`` to 1 on a cosine over training.

    The backbone handed over is the teacher's (DINO evaluates the teacher), saved as paradigm ``dino``
    (``num_classes=0``) with ``model_kwargs`` as given: the backbones train with ``dynamic_img_size=True`` to take the
    smaller local crops, which changes no weight, so the file loads strictly into the fixed-size model.

    Args:
        model: timm architecture name, e.g. ``"vit_tiny_patch16_224"``.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``in_chans``, ...).
        pretrained_cfg: preprocessing of the model (timm's ``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``) when it differs from the architecture's default; it travels with the saved backbone
            and gives ``data_config``, from which the DataModule builds its evaluation transforms.
        out_dim: output dimensions of the DINO head.
        head_hidden: hidden width of the head's MLP.
        head_bottleneck: width of the head's normalised bottleneck.
        student_temp: student softmax temperature.
        teacher_temp: teacher softmax temperature after its warmup.
        warmup_teacher_temp: teacher temperature at epoch 0.
        warmup_teacher_temp_epochs: epochs of linear teacher-temperature warmup.
        center_momentum: EMA momentum of the center.
        ema_momentum: teacher EMA momentum at the first step (cosine schedule to 1.0).
        lr: peak learning rate (AdamW, betas 0.9/0.999; the default of any other optimizer given to the CLI).
        weight_decay: AdamW weight decay (constant).
        warmup_epochs: epochs of linear learning-rate warmup (may be fractional), then cosine decay to zero.
        backbone_path: where ``on_fit_end`` writes the teacher backbone (:meth:`save_backbone`); None: nowhere.
    """

    optimization = adamw_warmup_cosine(betas=(0.9, 0.999))

    def __init__(
        self,
        model: str,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_cfg: dict | None = None,
        out_dim: int = 1024,
        head_hidden: int = 256,
        head_bottleneck: int = 64,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        ema_momentum: float = 0.996,
        lr: float = 5e-4,
        weight_decay: float = 0.04,
        warmup_epochs: float = 1.0,
        backbone_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_hyperparameters()
        backbone = create_vit(model, model_kwargs, pretrained_cfg, dynamic_img_size=True)
        self.data_config = resolve_model_data_config(backbone)
        head = DINOHead(backbone.num_features, out_dim, head_hidden, head_bottleneck)
        self.student = DINONetwork(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._total_steps: float = math.inf

    @property
    def backbone(self) -> nn.Module:
        """The student's ViT (the teacher, its moving average, is the one handed over)."""
        return self.student.backbone

    def train(self, mode: bool = True) -> DINOPretraining:
        """Switch the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_temperature(self, epoch: int) -> float:
        """Teacher temperature at ``epoch``: linear warmup, then constant."""
        hp = self.hparams
        if epoch >= hp.warmup_teacher_temp_epochs:
            return hp.teacher_temp
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * epoch / (
            hp.warmup_teacher_temp_epochs
        )

    def ema_momentum(self, step: int) -> float:
        """Teacher EMA momentum for optimizer step ``step`` (0-based)."""
        return cosine(step, self._total_steps, self.hparams.ema_momentum, 1.0)

    def training_step(self, batch: tuple[Sequence[Tensor], Any], batch_idx: int) -> Tensor:
        crops, _ = batch
        if len(crops) < 2:
            raise UserError(f"DINO needs at least the two global crops, got {len(crops)} views")
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        student_out = self.student(crops)
        teacher_probs = dino_teacher_targets(teacher_out, self.center, self.teacher_temperature(self.current_epoch))
        loss = dino_loss(student_out, teacher_probs, len(crops), self.hparams.student_temp)
        update_center(self.center, teacher_out, self.hparams.center_momentum)
        entropy = -(teacher_probs * teacher_probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
        batch_size = crops[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/teacher_entropy", entropy, batch_size=batch_size)
        return loss

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Step the student, then move the teacher toward it (once per real optimizer step)."""
        step = self.trainer.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        ema_update(self.teacher, self.student, self.ema_momentum(step))

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The student's parameters (backbone and head), with no weight decay on biases, norms and tokens."""
        return _decay_groups(self.student, weight_decay)

    def configure_optimizers(self) -> Any:
        self._total_steps = self.trainer.estimated_stepping_batches  # the EMA momentum's schedule
        return super().configure_optimizers()

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The teacher backbone's weights (DINO evaluates the teacher), with the keys of a plain
        ``timm.create_model(model, num_classes=0, **model_kwargs)``."""
        return _detached_copy(self.teacher.backbone.state_dict())

    def save_backbone(self, path: str | Path) -> Path:
        """Write the teacher backbone with :func:`attnprune.save_model` (paradigm ``dino``, ``num_classes=0``)."""
        hp = self.hparams
        kwargs = {**(hp.model_kwargs or {}), "num_classes": 0}
        return _save_backbone(self.backbone_state_dict(), path, hp, "dino", kwargs)

    def on_fit_end(self) -> None:
        if self.hparams.backbone_path and self.trainer.is_global_zero:
            self.save_backbone(self.hparams.backbone_path)


class MAEPretraining(ConfigurableOptimizers, L.LightningModule):
    """Masked-autoencoder pretraining of a timm ViT.

    Batches are ``(images, labels)`` with ``images`` ``[B, C, H, W]`` at the model's input size; labels are ignored.

    The encoder is handed over for MAE fine-tuning, saved as paradigm ``mae``: the model of
    ``model_kwargs`` plus ``global_pool='avg', fc_norm=True``, which reads out ``fc_norm(mean of the patch tokens)``
    and so has no final per-token ``norm``; the encoder's final ``norm.*`` weights become ``fc_norm.*``
    (:func:`attnprune.pretrain.finetuning_state_dict`).

    Args:
        model: timm architecture name, e.g. ``"vit_tiny_patch16_224"``.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``in_chans``, ...).
        pretrained_cfg: preprocessing of the model (timm's ``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``) when it differs from the architecture's default; it travels with the saved encoder
            and gives ``data_config``, from which the DataModule builds its transforms.
        mask_ratio: fraction of patches hidden from the encoder.
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        norm_pix_loss: regress per-patch normalised pixels.
        lr: peak learning rate (AdamW, betas 0.9/0.95; the default of any other optimizer given to the CLI).
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of linear learning-rate warmup (may be fractional), then cosine decay to zero.
        backbone_path: where ``on_fit_end`` writes the encoder (:meth:`save_backbone`); None: nowhere.
    """

    optimization = adamw_warmup_cosine(betas=(0.9, 0.95))

    def __init__(
        self,
        model: str,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_cfg: dict | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        backbone_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_hyperparameters()
        encoder = create_vit(model, model_kwargs, pretrained_cfg)
        self.data_config = resolve_model_data_config(encoder)
        self.mae = MaskedAutoencoder(encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss)

    @property
    def backbone(self) -> nn.Module:
        """The encoder ViT."""
        return self.mae.encoder

    def training_step(self, batch: tuple[Tensor, Any], batch_idx: int) -> Tensor:
        images, _ = batch
        loss, _, _ = self.mae(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The encoder's and decoder's parameters, with no weight decay on biases, norms and tokens."""
        return _decay_groups(self.mae, weight_decay)

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights, with the keys of a plain
        ``timm.create_model(model, num_classes=0, **model_kwargs)``."""
        return _detached_copy(self.mae.encoder.state_dict())

    def save_backbone(self, path: str | Path) -> Path:
        """Write the encoder with :func:`attnprune.save_model` as paradigm ``mae`` (average-pool readout), its final
        ``norm.*`` weights renamed ``fc_norm.*``."""
        hp = self.hparams
        kwargs = {**(hp.model_kwargs or {}), **PARADIGMS["mae"].model_kwargs, "num_classes": 0}
        return _save_backbone(finetuning_state_dict(self.backbone_state_dict()), path, hp, "mae", kwargs)

    def on_fit_end(self) -> None:
        if self.hparams.backbone_path and self.trainer.is_global_zero:
            self.save_backbone(self.hparams.backbone_path)
