"""Hugging Face transformers ViTs as the timm ViTs they are: ViT, DeiT (with or without its distillation head) and
DINOv2 (with or without register tokens, headless or with its linear classifier).

Each layer of these models is timm's pre-norm block under other names: query, key and value projections (joined
into timm's ``qkv``), the output projection, two LayerNorms, the MLP and, in DINOv2, layer scale. The state dict is
renamed as timm's own converters do, for the names of transformers 4 (``encoder.layer.N.attention.attention.query``)
and of transformers 5 (``layers.N.attention.q_proj``) alike. What differs is carried by the constructor arguments:
the LayerNorm epsilon, the activation, DeiT's distillation token (a second prefix token; timm's distilled model where
the distillation head is there too), DINOv2's register tokens (inserted after the position embedding, timm's
``no_embed_class`` layout as its ``_convert_dinov2`` does) and the image size of the image processor (DINOv2's
position embedding resampled as transformers interpolates it at every forward).

A base model (``ViTModel``, ``DeiTModel``, ``Dinov2Model``) becomes a headless timm model whose output is the normed
class token, ``last_hidden_state[:, 0]``; the pooler of ``ViTModel`` and ``DeiTModel`` (a dense layer and tanh on it)
is not part of the converted model, as timm drops the pre-logits layer of the original ViT.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from attnprune.adapters.architectures import assemble, import_library
from attnprune.errors import HubUnavailableError, UserError, UserTypeError
from attnprune.hub import offline_unless_hub_reachable

__all__ = ["HF_CLASSES", "convert_hf", "load_hf"]

HF_CLASSES: dict[str, tuple[str, str | None]] = {
    "ViTModel": ("vit", None),
    "ViTForImageClassification": ("vit", "classifier"),
    "DeiTModel": ("deit", None),
    "DeiTForImageClassification": ("deit", "classifier"),
    "DeiTForImageClassificationWithTeacher": ("deit", "teacher"),
    "Dinov2Model": ("dinov2", None),
    "Dinov2ForImageClassification": ("dinov2", "class_mean"),
    "Dinov2WithRegistersModel": ("dinov2", None),
    "Dinov2WithRegistersForImageClassification": ("dinov2", "class_mean"),
}
"""The transformers classes :func:`convert_hf` takes: their family and head (None: headless)."""

ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
"""transformers' ``hidden_act`` names and timm's ``act_layer`` of the same function."""

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
"""PIL's resampling filters (an image processor's ``resample``) by timm's interpolation names."""

_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_LAYER_PARTS = {  # a module inside one layer, transformers 4 and 5 names -> timm's Block
    "attention.attention.query": "q",
    "attention.q_proj": "q",
    "attention.attention.key": "k",
    "attention.k_proj": "k",
    "attention.attention.value": "v",
    "attention.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "norm1": "norm1",
    "layernorm_after": "norm2",
    "norm2": "norm2",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
}
_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
_DROPPED = ("embeddings.mask_token", "pooler.")


def convert_hf(model: nn.Module, image_processor: Any = None, **model_kwargs: Any) -> VisionTransformer:
    """The timm ViT computing what a transformers model computes (logits, or the normed class token of a base model).

    Args:
        model: one of :data:`HF_CLASSES`.
        image_processor: its image processor (``AutoImageProcessor.from_pretrained``): its size, crop, mean and std
            become the model's ``pretrained_cfg`` and its crop the input size; None: the config's image size with
            ImageNet's mean and std.
        **model_kwargs: timm constructor arguments over the converted ones (``img_size`` resamples the position
            embedding; ``drop_path_rate`` for fine-tuning).

    Returns:
        A new timm model in eval mode (the library's model is left as it was).

    Raises:
        UserTypeError: ``model`` is not one of :data:`HF_CLASSES`.
        UserError: a configuration timm's ViT cannot express (named, with its value).
    """
    name = type(model).__name__
    if name not in HF_CLASSES:
        raise UserTypeError(f"transformers' {name} cannot be converted; supported: {', '.join(HF_CLASSES)}")
    family, head = HF_CLASSES[name]
    config = model.config
    pretrained_cfg = _hf_data_config(image_processor, config)
    architecture, kwargs = _hf_arguments(name, config)
    kwargs["img_size"] = list(pretrained_cfg["input_size"][1:])
    kwargs.update(model_kwargs)
    state = _hf_state(model, kwargs, family, head)
    paradigm = {None: "dino", "teacher": "distilled"}.get(head, "supervised")
    return assemble(architecture, kwargs, pretrained_cfg, state, f"transformers {name}", paradigm)


def _pair(value: int | list[int] | tuple[int, int]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _hf_arguments(name: str, config: Any) -> tuple[str, dict[str, Any]]:
    """The timm class and constructor arguments of a transformers model's config.

    Raises:
        UserError: the activation, head width, MLP width or SwiGLU MLP has no timm equivalent here.
    """
    family, head = HF_CLASSES[name]
    if config.hidden_act not in ACTIVATIONS:
        raise UserError(f"{name}: hidden_act {config.hidden_act!r} has no timm equivalent (known: {list(ACTIVATIONS)})")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise UserError(f"{name}: head_dim {head_dim} x {config.num_attention_heads} heads is not hidden_size")
    if getattr(config, "use_swiglu_ffn", False):
        raise UserError(f"{name}: use_swiglu_ffn=True (a SwiGLU MLP, DINOv2 ViT-g) is not supported")
    ratio = config.mlp_ratio if family == "dinov2" else config.intermediate_size / config.hidden_size
    if family != "dinov2" and int(config.hidden_size * ratio) != config.intermediate_size:
        raise UserError(f"{name}: intermediate_size {config.intermediate_size} is no width timm's MLP can take")
    kwargs = {
        "patch_size": _pair(config.patch_size),
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": ratio,
        "qkv_bias": config.qkv_bias,
        "act_layer": ACTIVATIONS[config.hidden_act],
        "norm_eps": config.layer_norm_eps,
        "num_classes": config.num_labels if head is not None else 0,
    }
    if family == "deit" and head != "teacher":
        kwargs["reg_tokens"] = 1  # the distillation token: a second prefix token with a position embedding
    if family == "dinov2":
        kwargs["init_values"] = config.layerscale_value
        registers = getattr(config, "num_register_tokens", 0)
        if registers:
            kwargs.update(reg_tokens=registers, no_embed_class=True)
    classes = {"teacher": "VisionTransformerDistilled", "class_mean": "ClassMeanVisionTransformer"}
    return classes.get(head, "VisionTransformer"), kwargs


def _hf_state(model: nn.Module, kwargs: dict[str, Any], family: str, head: str | None) -> dict[str, Tensor]:
    """The transformers model's weights under timm's names (the position embedding resampled to ``img_size``)."""
    prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
    state, qkv = {}, {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            module, _, param = key.partition(".")
            if module not in _HEADS:
                raise UserError(f"cannot convert weight {key!r} of {type(model).__name__}")
            state[f"{_HEADS[module]}.{param}"] = value
            continue
        key = key[len(prefix) :]
        layer = _LAYER.match(key)
        if key.startswith(_DROPPED):
            continue
        if layer is not None and layer.group(2) in _LAYER_PARTS:
            index, part, param = layer.group(1), _LAYER_PARTS[layer.group(2)], layer.group(3)
            if part in ("q", "k", "v"):
                qkv.setdefault((index, param), {})[part] = value
            else:
                state[f"blocks.{index}.{part}.{'gamma' if param == 'lambda1' else param}"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            state["patch_embed.proj." + key.rpartition(".")[2]] = value
        elif key.startswith("layernorm."):
            state["norm." + key.rpartition(".")[2]] = value
        elif key in ("embeddings.cls_token", "embeddings.position_embeddings"):
            state[{"embeddings.cls_token": "cls_token"}.get(key, "pos_embed")] = value
        elif key in ("embeddings.distillation_token", "embeddings.register_tokens"):
            state["dist_token" if head == "teacher" else "reg_token"] = value
        else:
            raise UserError(f"cannot convert weight {prefix}{key!r} of {type(model).__name__}")
    for (index, param), parts in qkv.items():
        state[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if kwargs.get("no_embed_class"):  # registers: the class token takes its position embedding, as timm converts
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    config, registers = model.config, bool(kwargs.get("no_embed_class"))
    patch = _pair(kwargs["patch_size"])
    # transformers interpolates the position embedding to the input at every forward (DINOv2; ViT and DeiT when
    # asked), antialiased in the register models only
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=[size // step for size, step in zip(kwargs["img_size"], patch, strict=True)],
        old_size=[size // step for size, step in zip(_pair(config.image_size), patch, strict=True)],
        num_prefix_tokens=0 if registers else 2 if family == "deit" else 1,
        interpolation="bicubic",
        antialias=registers,
        align_corners=False,
    )
    return state


def _hf_data_config(processor: Any, config: Any) -> dict[str, Any]:
    """timm's preprocessing (``pretrained_cfg`` keys) equal to an image processor's, or the config's image size with
    ImageNet's mean and std when there is none.

    Raises:
        UserError: a processor step timm's transforms cannot express (named, with its value).
    """
    channels = config.num_channels
    if processor is None:
        return {"input_size": (channels, *_pair(config.image_size))}
    cfg = processor.to_dict()
    if not cfg.get("do_rescale", True) or abs(cfg.get("rescale_factor", 1 / 255) * 255 - 1) > 1e-6:
        raise UserError(f"image processor: rescale_factor {cfg.get('rescale_factor')} (timm scales pixels by 1/255)")
    size = cfg.get("size") or {}
    if "height" in size and "width" in size:
        resized, mode = (size["height"], size["width"]), "squash"
    elif "shortest_edge" in size and cfg.get("do_center_crop"):
        resized, mode = (size["shortest_edge"],) * 2, "center"
    else:
        raise UserError(f"image processor: size {size} has no timm equivalent (height and width, or shortest_edge)")
    crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    input_size = (crop["height"], crop["width"]) if crop else resized
    normalize = cfg.get("do_normalize", True)
    resample = int(cfg.get("resample") if cfg.get("resample") is not None else 2)
    return {
        "input_size": (channels, *input_size),
        "interpolation": RESAMPLE.get(resample, "bilinear"),
        "crop_pct": _crop_pct(input_size[0], resized[0]),
        "crop_mode": mode,
        "mean": tuple(cfg["image_mean"]) if normalize else (0.0,) * channels,
        "std": tuple(cfg["image_std"]) if normalize else (1.0,) * channels,
    }


def _crop_pct(crop: int, resized: int) -> float:
    """``crop / resized``, rounded down where needed so that timm's ``floor(crop / crop_pct)`` gives ``resized`` back
    (32 / (32 / 36) is 35.99...)."""
    pct = crop / resized
    while math.floor(crop / pct) < resized:
        pct = math.nextafter(pct, 0.0)
    return pct


def load_hf(source: str, **model_kwargs: Any) -> VisionTransformer:
    """A transformers model from a local ``save_pretrained`` folder or a hub id, converted by :func:`convert_hf`
    with its image processor (when it has one).

    Offline (the hub unreachable, or ``HF_HUB_OFFLINE``), a hub id loads from the local cache alone and fails at once
    when it is not there.

    Raises:
        FileNotFoundError: ``source`` is a path (``/``, ``.``, ``~`` first) that does not exist.
        UserError: a file instead of a folder, an architecture :func:`convert_hf` does not take, transformers not
            installed.
        HubUnavailableError: a hub id that could not be loaded (offline without a cached copy, unknown, gated).
    """
    transformers = import_library("transformers", "hf")
    path = Path(source).expanduser()
    if path.is_file():
        raise UserError(f"hf:{source} is a file; expected a folder saved by save_pretrained, or a hub id")
    if not path.is_dir() and source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"hf:{source}: folder {path} does not exist; expected a save_pretrained folder")
    location = str(path) if path.is_dir() else source
    with offline_unless_hub_reachable() as offline:
        try:
            config = transformers.AutoConfig.from_pretrained(location, local_files_only=offline)
            name = (getattr(config, "architectures", None) or ["(none named in its config)"])[0]
            if name not in HF_CLASSES:
                supported = ", ".join(HF_CLASSES)
                raise UserError(f"hf:{source} is a {name}, which attnprune cannot convert; supported: {supported}")
            model = getattr(transformers, name).from_pretrained(location, local_files_only=offline)
            processor = _hf_processor(transformers, location, offline)
        except OSError as err:
            if path.is_dir():
                raise UserError(f"hf:{source}: {str(err).strip().splitlines()[0]}") from err
            raise HubUnavailableError(
                f"could not load Hugging Face model 'hf:{source}' ({path.absolute()} is no local folder; from the hub: "
                f"{str(err).strip().splitlines()[0]}). Offline, pass a folder saved by save_pretrained: "
                "load_model('hf:path/to/folder')"
            ) from err
    return convert_hf(model.float().eval(), processor, **model_kwargs)


def _hf_processor(transformers: Any, location: str, offline: bool) -> Any:
    """The image processor saved with the model, or None when it has none."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(location, local_files_only=offline)
    except (OSError, ValueError):  # no preprocessor_config.json
        return None
