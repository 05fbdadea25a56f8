"""open_clip's image tower (its ``VisionTransformer``) as the timm ViT it is, projection included.

The tower is timm's CLIP layout, which timm's ``_convert_openai_clip`` converts: a patch embedding without bias, a
LayerNorm before the blocks (``pre_norm``), ``nn.MultiheadAttention`` blocks (its packed ``in_proj`` is timm's
``qkv``), a final LayerNorm, class-token (or average) pooling and the projection to the joint embedding, which
becomes the head (a linear layer with a zero bias, as timm keeps CLIP towers). The converted model's output is what
``model.visual(images)`` returns, so ``clip.visual = attnprune.convert(clip.visual)`` makes ``clip.encode_image``
prune once the tower is pruned. Towers timm's ViT cannot express are refused, naming the option: attentional
pooling, no pooling, token outputs, the custom blocks (qk-norm, scaled cosine attention, head scales).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from attnprune.adapters.architectures import assemble, import_library
from attnprune.errors import HubUnavailableError, UserError, UserTypeError
from attnprune.hub import offline_unless_hub_reachable

__all__ = ["convert_open_clip", "load_open_clip"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SCHEMAS = ("hf-hub:", "local-dir:")
"""open_clip model names that carry their own weights (``pretrained`` is ignored with them)."""

_RENAMES = (  # open_clip -> timm, in this order (timm's _convert_openai_clip)
    ("conv1", "patch_embed.proj"),
    ("class_embedding", "cls_token"),
    ("positional_embedding", "pos_embed"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_1", "norm1"),
    ("ln_2", "norm2"),
    ("ls_1", "ls1"),
    ("ls_2", "ls2"),
    ("attn.in_proj_", "attn.qkv."),
    ("attn.out_proj", "attn.proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def convert_open_clip(visual: nn.Module, preprocess_cfg: dict[str, Any] | None = None) -> VisionTransformer:
    """The timm ViT computing what open_clip's image tower computes (``model.visual(images)``).

    Args:
        visual: an open_clip ``VisionTransformer`` (``clip.visual``).
        preprocess_cfg: open_clip's preprocessing (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``);
            default the one the tower carries (``visual.preprocess_cfg``), else open_clip's defaults.

    Returns:
        A new timm model in eval mode (the tower is left as it was).

    Raises:
        UserTypeError: ``visual`` is not open_clip's ``VisionTransformer`` (a timm or ResNet tower).
        UserError: an option timm's ViT cannot express (named).
    """
    if type(visual).__name__ != "VisionTransformer":
        raise UserTypeError(
            f"open_clip's {type(visual).__name__} image tower cannot be converted; attnprune converts open_clip's "
            "VisionTransformer"
        )
    _check_tower(visual)
    kwargs = _open_clip_arguments(visual)
    pretrained_cfg = _open_clip_data_config(preprocess_cfg or getattr(visual, "preprocess_cfg", None) or {}, visual)
    state = {}
    for key, value in visual.state_dict().items():
        for old, new in _RENAMES:
            key = key.replace(old, new)
        state[key] = value
    state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    state["pos_embed"] = state["pos_embed"].unsqueeze(0)
    if not kwargs["pre_norm"]:  # timm's patch embedding has a bias without the pre-norm; open_clip's never has
        state["patch_embed.proj.bias"] = torch.zeros(kwargs["embed_dim"])
    if kwargs.get("fc_norm"):
        state.update({f"fc_norm.{p}": state.pop(f"ln_post.{p}") for p in ("weight", "bias")})
    else:
        state.update({f"norm.{p}": state.pop(f"ln_post.{p}") for p in ("weight", "bias")})
    projection: Tensor | None = state.pop("proj", None)
    if projection is not None:
        state.update({"head.weight": projection.T, "head.bias": torch.zeros(projection.shape[1])})
    return assemble("VisionTransformer", kwargs, pretrained_cfg, state, "open_clip VisionTransformer")


def _check_tower(visual: nn.Module) -> None:
    """Refuse a tower timm's ViT cannot express, naming the option."""
    block = visual.transformer.resblocks[0]
    refused = {
        "attentional_pool": visual.attn_pool is not None,
        f"pool_type={visual.pool_type!r}": visual.pool_type not in ("tok", "avg"),
        "output_tokens=True": visual.output_tokens,
        f"block_type='custom' ({type(block).__name__}: qk_norm, scaled cosine attention, head or MLP scales)": type(
            block
        ).__name__
        != "ResidualAttentionBlock",
    }
    for option, present in refused.items():
        if present:
            raise UserError(f"open_clip VisionTransformer with {option} cannot be converted to a timm ViT")


def _open_clip_arguments(visual: nn.Module) -> dict[str, Any]:
    """timm constructor arguments of an open_clip ``VisionTransformer``."""
    block = visual.transformer.resblocks[0]
    width = visual.conv1.out_channels
    act = block.mlp.gelu
    act_name = {"QuickGELU": "quick_gelu", "GELU": "gelu_tanh" if getattr(act, "approximate", "") == "tanh" else "gelu"}
    if type(act).__name__ not in act_name:
        raise UserError(f"open_clip VisionTransformer with activation {type(act).__name__} cannot be converted")
    kwargs = {
        "img_size": list(visual.image_size),
        "patch_size": list(visual.patch_size),
        "embed_dim": width,
        "depth": len(visual.transformer.resblocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.c_fc.out_features / width,
        "qkv_bias": block.attn.in_proj_bias is not None,
        "act_layer": act_name[type(act).__name__],
        "norm_eps": visual.ln_post.eps,
        "pre_norm": not isinstance(visual.ln_pre, nn.Identity),
        "num_classes": 0 if visual.proj is None else visual.proj.shape[1],
        "global_pool": {"tok": "token", "avg": "avg"}[visual.pool_type],
    }
    if visual.pool_type == "avg":
        kwargs["fc_norm"] = bool(visual.final_ln_after_pool)
    if not isinstance(block.ls_1, nn.Identity):
        kwargs["init_values"] = 1.0  # the layer scale's value is loaded
    if not isinstance(visual.patch_dropout, nn.Identity):
        kwargs["patch_drop_rate"] = visual.patch_dropout.prob
    return kwargs


def _open_clip_data_config(cfg: dict[str, Any], visual: nn.Module) -> dict[str, Any]:
    """timm's preprocessing (``pretrained_cfg`` keys) equal to open_clip's validation transform.

    Raises:
        UserError: a resize mode timm's transforms do not have (``longest``).
    """
    size = cfg.get("size", visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = {"shortest": "center", "squash": "squash"}.get(cfg.get("resize_mode", "shortest"))
    if mode is None:
        raise UserError(f"open_clip resize_mode {cfg.get('resize_mode')!r} has no timm equivalent (shortest, squash)")
    return {
        "input_size": (3, *size),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": 1.0,
        "crop_mode": mode,
        "mean": tuple(cfg.get("mean", getattr(visual, "image_mean", None) or OPENAI_MEAN)),
        "std": tuple(cfg.get("std", getattr(visual, "image_std", None) or OPENAI_STD)),
    }


def load_open_clip(spec: str, **model_kwargs: Any) -> VisionTransformer:
    """The image tower of an open_clip model, converted by :func:`convert_open_clip` with the model's preprocessing.

    Args:
        spec: ``<arch>`` (random weights), ``<arch>:<pretrained>`` (a checkpoint file or one of open_clip's
            pretrained tags, from the hub) or a name with open_clip's own schema (``hf-hub:org/repo``,
            ``local-dir:/path``).
        **model_kwargs: passed to ``open_clip.create_model`` (``force_image_size``, ``force_quick_gelu``, ...).

    Raises:
        FileNotFoundError: a checkpoint file (a path with a weights suffix) that does not exist.
        UserError: an unknown architecture or tag, a tower that cannot be converted, open_clip not installed.
        HubUnavailableError: weights that could not be downloaded (offline without a cached copy).
    """
    open_clip = import_library("open_clip", "clip")
    name, pretrained = (spec, None) if spec.startswith(SCHEMAS) else spec.partition(":")[::2]
    if pretrained and Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip:{spec}: checkpoint {pretrained} does not exist")
    if name not in open_clip.list_models() and not spec.startswith(SCHEMAS):
        raise UserError(f"open_clip:{spec}: unknown open_clip architecture {name!r} (open_clip.list_models())")
    with offline_unless_hub_reachable():
        try:
            model = open_clip.create_model(name, pretrained=pretrained or None, **model_kwargs)
        except RuntimeError as err:
            raise UserError(f"open_clip:{spec}: {str(err).strip().splitlines()[0]}") from err
        except OSError as err:
            raise HubUnavailableError(
                f"could not load open_clip weights 'open_clip:{spec}' ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0]}). Offline, pass a checkpoint file: "
                "load_model('open_clip:ViT-B-32:/path/to/open_clip_model.safetensors')"
            ) from err
    return convert_open_clip(model.visual.float().eval())
