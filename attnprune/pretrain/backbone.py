"""The timm ViT a pretraining objective trains: created without a head, and handed over as a file that
:func:`attnprune.load_model` rebuilds alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from attnprune.errors import UserTypeError
from attnprune.io import build_model, check_model_kwargs, save_model

__all__ = ["create_vit", "export_backbone"]


def create_vit(
    model: str, model_kwargs: dict[str, Any] | None = None, pretrained_cfg: dict | None = None, **overrides: Any
) -> VisionTransformer:
    """A randomly initialised timm ViT without classifier head (``num_classes=0``).

    Args:
        model: timm architecture name.
        model_kwargs: ``timm.create_model`` arguments.
        pretrained_cfg: overlays the model's preprocessing (``input_size``, ``mean``, ``std``, ...).
        **overrides: arguments that take precedence over ``model_kwargs`` (e.g. ``dynamic_img_size=True``).

    Raises:
        TypeError: ``model`` is not a timm ``VisionTransformer``.
        UserError: a ``depth`` below 1.
    """
    kwargs = {**(model_kwargs or {}), "num_classes": 0, **overrides}
    check_model_kwargs(model, kwargs)
    vit = timm.create_model(model, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **kwargs)
    if not isinstance(vit, VisionTransformer):
        raise UserTypeError(f"pretraining expects a timm VisionTransformer, {model!r} is a {type(vit).__name__}")
    return vit


def export_backbone(
    state: dict[str, Tensor],
    path: str | Path,
    architecture: str,
    paradigm: str,
    model_kwargs: dict[str, Any],
    pretrained_cfg: dict | None,
) -> Path:
    """Load ``state`` strictly into the plain model :func:`attnprune.load_model` will build from the file, then write
    it with :func:`attnprune.save_model` (so a file that does not load back is never written).

    Args:
        state: the backbone's weights.
        path: the safetensors file to write.
        architecture: timm architecture name.
        paradigm: the paradigm the file is loaded as (its readout).
        model_kwargs: ``timm.create_model`` arguments of the plain model (``num_classes`` included).
        pretrained_cfg: preprocessing that travels with the weights.

    Returns:
        The path written.
    """
    model = build_model(architecture, paradigm, pretrained_cfg, **model_kwargs)
    model.load_state_dict(state, strict=True)
    return save_model(model, path, architecture, paradigm, model_kwargs)
