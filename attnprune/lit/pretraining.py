"""The small self-supervised pretraining objectives that produce the offline DINO and MAE paradigm models.

- :class:`DINOPretraining`: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised
  Vision Transformers", ICCV 2021). A student ViT matches, across crops of one image, the centred and sharpened
  output of a teacher whose weights are an exponential moving average (EMA) of the student's.
- :class:`MAEPretraining`: masked autoencoding (He et al., "Masked Autoencoders Are Scalable Vision Learners",
  CVPR 2022). The encoder sees a random 25% of the patches; a light decoder reconstructs the pixels of the rest.

Both train a plain timm ``VisionTransformer`` and hand it over with ``backbone_state_dict()``, which loads strictly
into ``timm.create_model(model, num_classes=0, **model_kwargs)``, and with ``save_backbone(path)`` (also run at the end
of ``fit`` when ``backbone_path`` is set), a safetensors file that :func:`attnprune.load_model` rebuilds alone and
that the downstream modules take as ``checkpoint``: the DINO teacher for :class:`~attnprune.lit.modules.LinearProbe`
and :class:`~attnprune.lit.modules.KNNClassifier`, the MAE encoder for
:class:`~attnprune.lit.modules.PrunedClassifier` with ``paradigm="mae"``. The ``nn.Module`` pieces (:class:`DINOHead`,
:class:`DINONetwork`, :class:`MaskedAutoencoder`) and the loss functions are plain torch; the LightningModules wire
them to optimisers, schedules and logging. Written from the papers' descriptions, not from their repositories.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.data import resolve_model_data_config
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from attnprune.errors import UserError, UserTypeError
from attnprune.io import build_model, save_model
from attnprune.lit.optim import cosine, warmup_cosine
from attnprune.paradigms import PARADIGMS

__all__ = [
    "DINOHead",
    "DINONetwork",
    "DINOPretraining",
    "MAEPretraining",
    "MaskedAutoencoder",
    "create_vit",
    "dino_loss",
    "dino_teacher_targets",
    "ema_update",
    "sincos_pos_embed_2d",
    "update_center",
]

_NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token")


def create_vit(
    model: str, model_kwargs: dict[str, Any] | None = None, pretrained_cfg: dict | None = None, **overrides: Any
) -> VisionTransformer:
    """A randomly initialised timm ViT without classifier head (``num_classes=0``); ``pretrained_cfg`` overlays its
    preprocessing (``input_size``, ``mean``, ``std``, ...)."""
    kwargs = {**(model_kwargs or {}), "num_classes": 0, **overrides}
    vit = timm.create_model(model, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **kwargs)
    if not isinstance(vit, VisionTransformer):
        raise UserTypeError(f"pretraining expects a timm VisionTransformer, {model!r} is a {type(vit).__name__}")
    return vit


# ----------------------------------------------------------------------------------------------------------------
# DINO pieces
# ----------------------------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """DINO projection head: a 3-layer MLP with GELU, an L2-normalised bottleneck and a weight-normalised linear
    layer without bias to ``out_dim`` prototypes.

    The last layer's weight norm has its gain fixed at 1 (the paper's default), so it is written directly as a
    linear map with unit-norm rows.

    Args:
        in_dim: backbone feature width.
        out_dim: number of output dimensions (prototypes).
        hidden_dim: width of the MLP's hidden layers.
        bottleneck_dim: width of the normalised bottleneck.
    """

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 256, bottleneck_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_dim]`` features to ``[B, out_dim]`` logits (cosines between bottleneck and prototypes)."""
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=-1))


class DINONetwork(nn.Module):
    """A ViT backbone and a :class:`DINOHead` applied to a list of crops.

    Consecutive crops of the same resolution run through the backbone as one batch (global crops together, local
    crops together), so the backbone must accept several input sizes (timm's ``dynamic_img_size=True``).
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        """``V`` crops of ``[B, C, H_v, W_v]`` to ``[V * B, out_dim]`` logits, crop after crop."""
        features, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))


def dino_teacher_targets(teacher_out: Tensor, center: Tensor, temperature: float) -> Tensor:
    """Teacher probabilities: centred (against collapse to one dimension) and sharpened (against uniformity)."""
    return ((teacher_out - center) / temperature).softmax(dim=-1)


def dino_loss(student_out: Tensor, teacher_probs: Tensor, num_views: int, student_temp: float) -> Tensor:
    """Cross-entropy between teacher and student distributions over every pair of different views, averaged.

    Args:
        student_out: ``[V * B, K]`` student logits, view after view (the global views first).
        teacher_probs: ``[G * B, K]`` teacher probabilities for the first ``G`` (global) views.
        num_views: ``V``.
        student_temp: temperature of the student softmax.

    Returns:
        The scalar loss.
    """
    student_logp = (student_out / student_temp).log_softmax(dim=-1).chunk(num_views)
    batch = student_out.shape[0] // num_views
    total, pairs = student_out.new_zeros(()), 0
    for t, target in enumerate(teacher_probs.split(batch)):
        for s, logp in enumerate(student_logp):
            if s != t:
                total = total - (target * logp).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


def _mean_across_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> None:
    """In place: ``center <- momentum * center + (1 - momentum) * mean(teacher_out)`` (mean over all ranks)."""
    batch_center = _mean_across_ranks(teacher_out.mean(dim=0, keepdim=True))
    center.mul_(momentum).add_(batch_center, alpha=1.0 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, for every parameter: ``teacher <- momentum * teacher + (1 - momentum) * student``."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


# ----------------------------------------------------------------------------------------------------------------
# MAE pieces
# ----------------------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings ``[grid_h * grid_w, dim]`` in row-major token order (a quarter of
    the channels each for sin(x), cos(x), sin(y), cos(y))."""
    if dim % 4:
        raise UserError(f"sine-cosine position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    angle_x, angle_y = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega
    return torch.cat([angle_x.sin(), angle_x.cos(), angle_y.sin(), angle_y.cos()], dim=1).float()


class MaskedAutoencoder(nn.Module):
    """MAE around a timm ViT encoder: mask patches at random, encode the visible ones, decode all pixels.

    The encoder keeps its prefix tokens (class token); position embeddings are added before masking, so visible
    tokens keep their positions. The decoder embeds the encoder output to ``decoder_dim``, puts a shared learned mask
    token at every hidden position, adds fixed sine-cosine position embeddings and runs a few timm ``Block``s before
    a linear prediction of each patch's pixels.

    Args:
        encoder: a timm ``VisionTransformer`` with a fixed input size.
        mask_ratio: fraction of patch tokens hidden from the encoder, in ``[0, 1)``.
        decoder_dim: decoder width (divisible by 4 and by ``decoder_heads``).
        decoder_depth: decoder blocks.
        decoder_heads: attention heads per decoder block.
        norm_pix_loss: regress per-patch normalised pixels (zero mean, unit variance per patch).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise UserError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if encoder.dynamic_img_size:
            raise UserError("MAE pretraining needs a fixed input size; create the encoder without dynamic_img_size")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.num_prefix = encoder.num_prefix_tokens
        self.patch_size = tuple(encoder.patch_embed.patch_size)
        self.in_chans = encoder.patch_embed.proj.in_channels
        grid_h, grid_w = encoder.patch_embed.grid_size

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        pos = sincos_pos_embed_2d(decoder_dim, grid_h, grid_w)
        pos = torch.cat([pos.new_zeros(self.num_prefix, decoder_dim), pos])[None]
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size[0] * self.patch_size[1] * self.in_chans)

    def num_visible(self, num_patches: int) -> int:
        """Patch tokens the encoder sees: ``round(num_patches * (1 - mask_ratio))``, at least one."""
        return max(1, round(num_patches * (1.0 - self.mask_ratio)))

    def patchify(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` to ``[B, N, p_h * p_w * C]``, patches in the patch embedding's (row-major) order."""
        b, c, h, w = images.shape
        ph, pw = self.patch_size
        x = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)

    def random_masking(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a random subset of each image's patch tokens (argsort of uniform noise).

        Args:
            tokens: ``[B, N, C]`` patch tokens (no prefix).

        Returns:
            ``visible`` ``[B, K, C]``, ``mask`` ``[B, N]`` (1 where hidden) and ``restore`` ``[B, N]``, the
            permutation that puts ``cat(visible, hidden)`` back in token order.
        """
        b, n, c = tokens.shape
        keep = self.num_visible(n)
        shuffle = torch.rand(b, n, device=tokens.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = tokens.gather(1, shuffle[:, :keep, None].expand(-1, -1, c))
        mask = torch.ones(b, n, device=tokens.device)
        mask[:, :keep] = 0
        return visible, mask.gather(1, restore), restore

    def forward_encoder(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches: ``[B, P + K, D]`` latents (prefix first), ``mask`` and ``restore``."""
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(images))
        visible, mask, restore = self.random_masking(x[:, self.num_prefix :])
        x = enc.norm_pre(torch.cat([x[:, : self.num_prefix], visible], dim=1))
        return enc.norm(enc.blocks(x)), mask, restore

    def forward_decoder(self, latent: Tensor, restore: Tensor) -> Tensor:
        """Predict every patch's pixels ``[B, N, p_h * p_w * C]`` from the latents of the visible patches."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, n = restore.shape
        hidden = self.mask_token.expand(b, n - visible.shape[1], -1)
        patches = torch.cat([visible, hidden], dim=1).gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix :])

    def reconstruction_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the hidden patches only (on per-patch normalised pixels if ``norm_pix_loss``)."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(loss, pred, mask)`` for ``[B, C, H, W]`` images."""
        latent, mask, restore = self.forward_encoder(images)
        pred = self.forward_decoder(latent, restore)
        return self.reconstruction_loss(images, pred, mask), pred, mask


# ----------------------------------------------------------------------------------------------------------------
# Optimisation shared by both objectives
# ----------------------------------------------------------------------------------------------------------------


def _adamw_warmup_cosine(
    module: L.LightningModule,
    params: nn.Module,
    lr: float,
    weight_decay: float,
    warmup_epochs: float,
    betas: tuple[float, float],
) -> tuple[dict[str, Any], float]:
    """AdamW (no decay on biases, norms, position embeddings and special tokens) with a per-step schedule: linear
    warmup over ``warmup_epochs``, then cosine decay to zero at the end of training. Also returns the total steps."""
    decay, no_decay = [], []
    for name, p in params.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_WEIGHT_DECAY
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    return warmup_cosine(optimizer, module.trainer, warmup_epochs), module.trainer.estimated_stepping_batches


def _detached_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def _export(
    state: dict[str, Tensor],
    path: str | Path,
    architecture: str,
    paradigm: str,
    model_kwargs: dict[str, Any],
    pretrained_cfg: dict | None,
) -> Path:
    """Load ``state`` strictly into the plain model :func:`attnprune.load_model` will build from the file, then
    write it with :func:`attnprune.save_model` (so a file that does not load back is never written)."""
    model = build_model(architecture, paradigm, pretrained_cfg, **model_kwargs)
    model.load_state_dict(state, strict=True)
    path = save_model(model, path, architecture, paradigm, model_kwargs)
    rank_zero_info(f"wrote the {paradigm} backbone to {path}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# LightningModules
# ----------------------------------------------------------------------------------------------------------------


class DINOPretraining(L.LightningModule):
    """DINO self-distillation of a timm ViT.

    Batches are ``(crops, labels)`` with ``crops`` a list ``[global1, global2, local1, ...]`` of ``[B, C, H, W]``
    tensors (an :class:`~attnprune.lit.data.ImageDataModule` with a
    :class:`~attnprune.lit.transforms.MultiCropTransform` as ``train_transform`` yields them); labels are
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
        lr: peak learning rate.
        weight_decay: AdamW weight decay (constant).
        warmup_epochs: epochs of linear learning-rate warmup (may be fractional).
        backbone_path: where ``on_fit_end`` writes the teacher backbone (:meth:`save_backbone`); None: nowhere.
    """

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
        backbone = create_vit(model, model_kwargs, pretrained_cfg, dynamic_img_size=True)
        self.data_config = resolve_model_data_config(backbone)
        head = DINOHead(backbone.num_features, out_dim, head_hidden, head_bottleneck)
        self.student = DINONetwork(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._total_steps: float = math.inf

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

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        config, self._total_steps = _adamw_warmup_cosine(
            self, self.student, hp.lr, hp.weight_decay, hp.warmup_epochs, betas=(0.9, 0.999)
        )
        return config

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The teacher backbone's weights (DINO evaluates the teacher), with the keys of a plain
        ``timm.create_model(model, num_classes=0, **model_kwargs)``."""
        return _detached_copy(self.teacher.backbone.state_dict())

    def save_backbone(self, path: str | Path) -> Path:
        """Write the teacher backbone with :func:`attnprune.save_model` (paradigm ``dino``, ``num_classes=0``)."""
        hp = self.hparams
        kwargs = {**(hp.model_kwargs or {}), "num_classes": 0}
        return _export(self.backbone_state_dict(), path, hp.model, "dino", kwargs, hp.pretrained_cfg)

    def on_fit_end(self) -> None:
        if self.hparams.backbone_path and self.trainer.is_global_zero:
            self.save_backbone(self.hparams.backbone_path)


class MAEPretraining(L.LightningModule):
    """Masked-autoencoder pretraining of a timm ViT.

    Batches are ``(images, labels)`` with ``images`` ``[B, C, H, W]`` at the model's input size; labels are ignored.

    The encoder is handed over for MAE fine-tuning, saved as paradigm ``mae``: the model of
    ``model_kwargs`` plus ``global_pool='avg', fc_norm=True``, which reads out ``fc_norm(mean of the patch tokens)``
    and so has no final per-token ``norm``. The pretrained encoder's final ``norm.weight`` / ``norm.bias`` become
    ``fc_norm.weight`` / ``fc_norm.bias`` (every other weight keeps its name): the fine-tuned model starts by
    normalising the average of the encoder's patch tokens with the encoder's own final LayerNorm. (This is a
    LayerNorm of the average, not the average of per-token LayerNorms; the MAE paper starts ``fc_norm`` afresh.)

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
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of linear learning-rate warmup (may be fractional).
        backbone_path: where ``on_fit_end`` writes the encoder (:meth:`save_backbone`); None: nowhere.
    """

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
        encoder = create_vit(model, model_kwargs, pretrained_cfg)
        self.data_config = resolve_model_data_config(encoder)
        self.mae = MaskedAutoencoder(encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss)

    def training_step(self, batch: tuple[Tensor, Any], batch_idx: int) -> Tensor:
        images, _ = batch
        loss, _, _ = self.mae(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        config, _ = _adamw_warmup_cosine(self, self.mae, hp.lr, hp.weight_decay, hp.warmup_epochs, betas=(0.9, 0.95))
        return config

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights, with the keys of a plain
        ``timm.create_model(model, num_classes=0, **model_kwargs)``."""
        return _detached_copy(self.mae.encoder.state_dict())

    def save_backbone(self, path: str | Path) -> Path:
        """Write the encoder with :func:`attnprune.save_model` as paradigm ``mae`` (average-pool readout), its final
        ``norm.*`` weights renamed ``fc_norm.*``."""
        hp = self.hparams
        state = {
            f"fc_norm.{key[len('norm.') :]}" if key.startswith("norm.") else key: value
            for key, value in self.backbone_state_dict().items()
        }
        kwargs = {**(hp.model_kwargs or {}), **PARADIGMS["mae"].model_kwargs, "num_classes": 0}
        return _export(state, path, hp.model, "mae", kwargs, hp.pretrained_cfg)

    def on_fit_end(self) -> None:
        if self.hparams.backbone_path and self.trainer.is_global_zero:
            self.save_backbone(self.hparams.backbone_path)
