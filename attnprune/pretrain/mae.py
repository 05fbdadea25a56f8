"""MAE in plain torch (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022): a timm ViT encoder
sees a random subset of the patches; a light decoder reconstructs the pixels of the rest.

Written from the paper's description, not from its repository.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from attnprune.errors import UserError

__all__ = ["MaskedAutoencoder", "finetuning_state_dict", "sincos_pos_embed_2d"]


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


def finetuning_state_dict(encoder_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's weights as the start of MAE fine-tuning (paradigm ``mae``: ``global_pool='avg', fc_norm=True``).

    The final per-token ``norm.*`` become ``fc_norm.*`` and every other weight keeps its name, so the fine-tuned
    model starts by normalising the average of the encoder's patch tokens with the encoder's own final LayerNorm.
    (A LayerNorm of the average, not the average of per-token LayerNorms; the MAE paper starts ``fc_norm`` afresh.)

    Args:
        encoder_state: the encoder's ``state_dict``.

    Returns:
        The renamed state dict (the same tensors).
    """
    return {
        f"fc_norm.{key[len('norm.') :]}" if key.startswith("norm.") else key: value
        for key, value in encoder_state.items()
    }
