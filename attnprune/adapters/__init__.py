"""Models of other libraries made prunable: Hugging Face transformers ViTs and open_clip's image towers.

An adapter here is a converter: it builds the timm ViT that computes what the library's model computes and copies the
weights over under timm's names, as timm's own converters do (``checkpoint_filter_fn``, ``_convert_openai_clip``,
``_convert_dinov2``). Converting rather than patching the library's forward is the cheaper way to make every part of
attnprune work on these models with the same routings: ``prune``, ``unprune``, ``count_flops``, the selectivity
analysis, the search, ``attnprune.compile`` and the entry points all read one model layout, timm's, whose block loop,
FLOPs count and CUDA paths are tested; a second layout would need its own copy of each. The cost is a copy of the
weights and a model of timm's class instead of the library's (outputs as tensors, not the library's output objects).

Which models: transformers' ViT, DeiT and DINOv2 (:data:`attnprune.adapters.hf.HF_CLASSES`) and open_clip's
``VisionTransformer`` (``clip.visual``); timm's own ``VisionTransformer`` is the identity adapter. The libraries are
optional (``pip install 'attnprune[hf]'``, ``'attnprune[clip]'``) and imported only when a model of theirs is
converted or loaded.

    model = attnprune.convert(transformers_model)       # a timm ViT with the same weights and outputs
    clip.visual = attnprune.convert(clip.visual)         # open_clip: the tower, so clip.encode_image prunes
    attnprune.prune(clip, "tome:r=8")                    # prune finds a converted tower in clip.visual
    model = attnprune.load_model("hf:facebook/deit-small-patch16-224")   # or a save_pretrained folder
    tower = attnprune.load_model("open_clip:ViT-B-32:open_clip_model.safetensors")
"""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from attnprune.adapters.architectures import ARCHITECTURES, build_architecture
from attnprune.adapters.hf import HF_CLASSES, convert_hf, load_hf
from attnprune.adapters.open_clip import convert_open_clip, load_open_clip
from attnprune.errors import UserError, UserTypeError

__all__ = ["ARCHITECTURES", "LIBRARY_PREFIXES", "build_architecture", "convert", "load_library_model"]

LIBRARY_PREFIXES = ("hf:", "open_clip:")
"""Model names :func:`attnprune.load_model` hands to :func:`load_library_model`."""


def convert(model: nn.Module, preprocessing: Any = None, **model_kwargs: Any) -> VisionTransformer:
    """The timm ViT computing what ``model`` computes, with its weights.

    Args:
        model: a transformers ViT, DeiT or DINOv2 model (:data:`~attnprune.adapters.hf.HF_CLASSES`), open_clip's
            ``VisionTransformer`` image tower (``clip.visual``), or a timm ``VisionTransformer`` (returned as it is).
        preprocessing: the library's preprocessing, kept as the model's ``pretrained_cfg``: a transformers image
            processor, or open_clip's preprocess config (a dict; default the one the tower carries).
        **model_kwargs: timm constructor arguments over the converted ones (transformers models only).

    Returns:
        A new timm model in eval mode (a timm model: ``model`` itself).

    Raises:
        UserTypeError: a model of another architecture (one line naming it and what is supported).
        UserError: an option of a supported architecture that timm's ViT cannot express (named).

    Example:
        >>> import torch, transformers
        >>> config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        ...                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
        >>> hf = transformers.ViTForImageClassification(config).eval()
        >>> model = convert(hf)  # same weights, timm's layout
        >>> type(model).__name__, model.num_classes, model.blocks[0].norm1.eps
        ('VisionTransformer', 5, 1e-12)
        >>> images = torch.randn(2, 3, 32, 32)
        >>> torch.allclose(model(images), hf(pixel_values=images).logits, atol=1e-5)
        True
    """
    if isinstance(model, VisionTransformer):
        return model
    library, name = type(model).__module__.partition(".")[0], type(model).__name__
    if library == "transformers":
        return convert_hf(model, preprocessing, **model_kwargs)
    if library == "open_clip" and hasattr(model, "visual"):
        raise UserTypeError(
            f"attnprune.convert takes open_clip's image tower, not the whole {name}: "
            "model.visual = attnprune.convert(model.visual)"
        )
    if library == "open_clip":
        if model_kwargs:
            raise UserError(f"attnprune.convert: open_clip towers take no model arguments, got {sorted(model_kwargs)}")
        return convert_open_clip(model, preprocessing)
    raise UserTypeError(
        f"attnprune.convert: {library}'s {name} is not supported; it converts transformers' "
        f"{', '.join(HF_CLASSES)}, open_clip's VisionTransformer and timm's VisionTransformer"
    )


def load_library_model(spec: str, **model_kwargs: Any) -> VisionTransformer:
    """A model named ``hf:<hub id or save_pretrained folder>`` or ``open_clip:<arch>[:<pretrained>]``, converted.

    Args:
        spec: the name (see :func:`~attnprune.adapters.hf.load_hf` and
            :func:`~attnprune.adapters.open_clip.load_open_clip`).
        **model_kwargs: timm constructor arguments over the converted ones (``hf:``), or ``open_clip.create_model``
            arguments (``open_clip:``).

    Raises:
        UserError: a name without a prefix of :data:`LIBRARY_PREFIXES`, or nothing after it.
    """
    prefix = next((p for p in LIBRARY_PREFIXES if spec.startswith(p)), None)
    if prefix is None or not spec[len(prefix) :]:
        raise UserError(f"model {spec!r}: expected hf:<hub id or folder> or open_clip:<arch>[:<pretrained>]")
    load = load_hf if prefix == "hf:" else load_open_clip
    return load(spec[len(prefix) :], **model_kwargs)
