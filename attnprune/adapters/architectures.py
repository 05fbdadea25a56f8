"""The timm classes a converted model is built from, by name, with constructor arguments that JSON can hold.

A converted model is a plain timm ``VisionTransformer`` (``VisionTransformerDistilled`` for a DeiT with its
distillation head, :class:`ClassMeanVisionTransformer` for DINOv2's linear classifier) built from its constructor's
arguments rather than from a timm model name: no timm name fits every configuration a library holds. The arguments are
recorded in the model's spec, so :func:`attnprune.io.build_model` rebuilds it (a Lightning checkpoint, a saved weights
file) without the library it came from. One argument is ours: ``norm_eps``, the epsilon of every LayerNorm (1e-12 in
transformers' ViT and DeiT, 1e-6 in DINOv2 and timm, 1e-5 in open_clip), which timm takes only as a ``norm_layer``
callable.
"""

from __future__ import annotations

import importlib
from functools import partial
from types import ModuleType
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from attnprune.errors import UserError, check_finite

__all__ = ["ARCHITECTURES", "ClassMeanVisionTransformer", "assemble", "build_architecture", "import_library"]


class ClassMeanVisionTransformer(VisionTransformer):
    """timm's ViT with the head of DINOv2's linear classifier (transformers' ``Dinov2ForImageClassification``): it
    reads the class token beside the mean of the patch tokens (register tokens left out), concatenated.

    Takes :class:`~timm.models.vision_transformer.VisionTransformer`'s arguments; the pooling is fixed (the final norm
    on every token, then the two read), so ``global_pool`` and ``fc_norm`` are set here.
    """

    pool_class_token = True  # read by attnprune.vit.head, which weights the mean by the size of merged tokens

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "global_pool": "avg", "fc_norm": False})
        self.head_hidden_size = 2 * self.embed_dim
        self.reset_classifier(self.num_classes)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """The class token and the mean of the patch tokens, concatenated: ``[B, T, C] -> [B, 2C]``."""
        return torch.cat([x[:, 0], super().pool(x, pool_type)], dim=-1)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head of ``num_classes`` on the concatenated features (``global_pool`` is fixed and ignored)."""
        self.num_classes = num_classes
        self.head = nn.Linear(2 * self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


ARCHITECTURES: dict[str, type[VisionTransformer]] = {
    cls.__name__: cls for cls in (VisionTransformer, VisionTransformerDistilled, ClassMeanVisionTransformer)
}
"""The classes of converted models by name (the ``architecture`` of their spec)."""


def build_architecture(
    name: str, pretrained_cfg: dict[str, Any] | None = None, norm_eps: float = 1e-6, **kwargs: Any
) -> VisionTransformer:
    """A randomly initialised model of :data:`ARCHITECTURES` in eval mode.

    Args:
        name: the class name.
        pretrained_cfg: preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
            ``crop_mode``) over the defaults: the model's input size, ImageNet's mean and std, bicubic, crop 0.9.
        norm_eps: epsilon of every LayerNorm.
        **kwargs: the class's constructor arguments.

    Example:
        >>> model = build_architecture("VisionTransformer", img_size=32, patch_size=8, embed_dim=32, depth=2,
        ...                            num_heads=2, num_classes=5, norm_eps=1e-12)
        >>> model.blocks[0].norm1.eps, model.pretrained_cfg["input_size"]
        (1e-12, (3, 32, 32))
    """
    model = ARCHITECTURES[name](norm_layer=partial(LayerNorm, eps=norm_eps), **kwargs)
    defaults = {
        "architecture": name,
        "input_size": (model.patch_embed.proj.in_channels, *model.patch_embed.img_size),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "center",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": model.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    model.pretrained_cfg = model.default_cfg = {**defaults, **(pretrained_cfg or {})}
    return model.eval()


def assemble(
    architecture: str,
    model_kwargs: dict[str, Any],
    pretrained_cfg: dict[str, Any],
    state: dict[str, Tensor],
    source: str,
    paradigm: str = "supervised",
) -> VisionTransformer:
    """A converted model: built by :func:`build_architecture`, its converted ``state`` loaded strictly, and its spec
    (architecture, arguments, paradigm, preprocessing) kept as ``model.attnprune_spec`` for Lightning checkpoints
    and :func:`attnprune.save_model`.

    Raises:
        UserError: ``state`` holds NaN or infinity (naming ``source`` and the weight).
    """
    check_finite(state, source)
    model = build_architecture(architecture, pretrained_cfg, **model_kwargs)
    model.load_state_dict(state)
    spec = {"architecture": architecture, "paradigm": paradigm, "model_kwargs": model_kwargs}
    model.attnprune_spec = {**spec, "pretrained_cfg": pretrained_cfg}
    return model


def import_library(name: str, extra: str) -> ModuleType:
    """The optional library ``name`` (``transformers``, ``open_clip``), imported when first needed.

    Raises:
        UserError: it is not installed (naming the extra that installs it).
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise UserError(f"{name} is not installed ({err}); install it with: pip install 'attnprune[{extra}]'") from err
