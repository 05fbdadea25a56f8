"""Loading and saving models whose preprocessing travels with their weights.

A model comes from a timm hub name, a local weights file (safetensors with our metadata, or a state dict with the
architecture given), a Lightning checkpoint of one of our modules, or another library (``hf:``, ``open_clip:``),
converted to a timm ViT by :mod:`attnprune.adapters`. Every loaded model is in eval mode and its
``pretrained_cfg`` carries its input size, mean and std, so ``timm.data.resolve_model_data_config`` builds the right
transforms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attnprune.adapters import ARCHITECTURES, LIBRARY_PREFIXES, build_architecture, load_library_model
from attnprune.atomic import atomic_path
from attnprune.errors import HubUnavailableError, UserError, UserTypeError, check_finite, check_number
from attnprune.hub import offline_unless_hub_reachable
from attnprune.paradigms import get_paradigm

__all__ = [
    "build_model",
    "build_from_spec",
    "check_model_kwargs",
    "model_spec",
    "load_model",
    "save_model",
]

METADATA_KEY = "attnprune"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def build_model(
    architecture: str, paradigm: str = "supervised", pretrained_cfg: dict | None = None, **model_kwargs: Any
) -> nn.Module:
    """A randomly initialised timm model with the paradigm's readout, in eval mode: ``architecture`` is a timm name,
    or one of :data:`attnprune.adapters.ARCHITECTURES` (the class of a model converted from another library).

    Raises:
        UserError: an unknown architecture, or a ``depth`` in ``model_kwargs`` below 1 (a ViT without blocks).
    """
    kwargs = {**get_paradigm(paradigm).model_kwargs, **model_kwargs}
    check_model_kwargs(architecture, kwargs)
    if architecture in ARCHITECTURES:  # a model converted from another library: timm's class by name
        return build_architecture(architecture, pretrained_cfg, **kwargs)
    try:
        model = timm.create_model(architecture, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"unknown timm architecture {architecture!r}") from err
        raise
    return model.eval()


def check_model_kwargs(architecture: str, model_kwargs: dict[str, Any]) -> None:
    """Refuse ``create_model`` arguments that build a model without work to do: a ``depth`` below 1 (no blocks).

    Raises:
        UserError: naming the architecture, the argument and its value.
    """
    if "depth" in model_kwargs:
        check_number(f"{architecture} model_kwargs depth", model_kwargs["depth"], 1, integer=True)


def model_spec(
    model: nn.Module, architecture: str, paradigm: str = "supervised", model_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` before loading its weights: architecture, constructor arguments,
    paradigm and the preprocessing of its ``pretrained_cfg``. Stored in weights files and Lightning checkpoints."""
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    cfg = {k: model.pretrained_cfg[k] for k in keys if k in model.pretrained_cfg}
    kwargs = {**(model_kwargs or {}), "num_classes": model.num_classes}
    return {"architecture": architecture, "paradigm": paradigm, "model_kwargs": kwargs, "pretrained_cfg": cfg}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A randomly initialised model from a :func:`model_spec` dict."""
    return build_model(
        spec["architecture"],
        spec.get("paradigm", "supervised"),
        spec.get("pretrained_cfg"),
        **spec.get("model_kwargs", {}),
    )


def _read_metadata(path: Path) -> dict[str, Any] | None:
    """The model spec a weights file records: its safetensors metadata, else the ``.json`` beside it, else None.

    Raises:
        UserError: the record is not a JSON object naming the architecture (the message names where it is).
    """
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
        if text:
            return _parse_spec(text, f"{path}: its '{METADATA_KEY}' metadata")
    sidecar = path.with_suffix(".json")
    return _parse_spec(sidecar.read_text(), str(sidecar)) if sidecar.is_file() else None


def _parse_spec(text: str, where: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not JSON ({err}): {text[:60]!r}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("architecture"), str):
        raise UserError(f"{where} is not a JSON object naming the 'architecture' (a timm name): {text[:60]!r}")
    return spec


def _load_state(model: nn.Module, state: dict[str, Tensor], source: str, architecture: str) -> None:
    _check_fits(model, state, source, architecture)
    model.load_state_dict(state)


def _check_fits(model: nn.Module, state: dict[str, Tensor], source: str, architecture: str) -> None:
    """Refuse weights ``state`` that ``model`` cannot load: keys missing or unexpected, shapes that differ, values
    that are not finite."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise UserError(
            f"{source} does not fit architecture {architecture!r}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch (checkpoint vs model) {mismatched[:5]}"
        )
    check_finite(state, source)


def _load_weights_file(path: Path, architecture: str | None, model_kwargs: dict[str, Any]) -> nn.Module:
    meta = _read_metadata(path)
    if meta is not None:
        if architecture is not None and architecture != meta["architecture"]:
            raise UserError(f"{path} holds a {meta['architecture']!r} but architecture {architecture!r} was asked for")
        architecture = meta["architecture"]
    elif architecture is None:
        raise UserError(
            f"{path} carries no architecture (no '{METADATA_KEY}' metadata, no {path.with_suffix('.json').name}): "
            "give its timm architecture: --architecture deit_small_patch16_224 (search.py, analyze.py), "
            "backbone.model (train.py, evaluate.py), teacher_architecture (a teacher), or "
            "load_model(path, architecture=...) in Python"
        )
    spec = dict(meta or {"architecture": architecture})
    spec["model_kwargs"] = {**spec.get("model_kwargs", {}), **model_kwargs}
    model = build_from_spec(spec)
    model.attnprune_spec = spec
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    _load_state(model, state, str(path), architecture)
    return model


def _load_lightning_checkpoint(path: Path, architecture: str | None, model_kwargs: dict[str, Any]) -> nn.Module:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    spec = checkpoint.get("hyper_parameters", {}).get("model_spec")
    if spec is None:
        raise UserError(f"{path} is not a checkpoint of an attnprune module (no 'model_spec' hyper-parameter)")
    if architecture is not None and architecture != spec["architecture"]:
        raise UserError(f"{path} holds a {spec['architecture']!r} but architecture {architecture!r} was asked for")
    spec = {**spec, "model_kwargs": {**spec["model_kwargs"], **model_kwargs}}
    model = build_from_spec(spec)
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    _load_state(model, state, str(path), spec["architecture"])
    model.attnprune_spec = spec
    return model


def load_model(spec: str | Path, architecture: str | None = None, **model_kwargs: Any) -> nn.Module:
    """Load a model for inference.

    Args:
        spec: a timm hub name (``deit_small_patch16_224.fb_in1k``), a local weights file (``.safetensors`` with our
            metadata, or ``.pth``/``.bin`` state dict with ``architecture``), or a Lightning ``.ckpt`` of one of
            attnprune's classification modules; or a model of another library, converted to the timm ViT that
            computes the same (:mod:`attnprune.adapters`): ``hf:<hub id or save_pretrained folder>`` (transformers'
            ViT, DeiT, DINOv2) or ``open_clip:<arch>[:<checkpoint file or pretrained tag>]`` (the image tower).
        architecture: the timm architecture, required for a weights file that does not name its own (hub names
            and models of other libraries name their own).
        **model_kwargs: timm ``create_model`` arguments; they complete (or override) those a file records
            (``open_clip:``: ``open_clip.create_model`` arguments).

    Returns:
        The model in eval mode; ``model.pretrained_cfg`` holds its input size, mean and std (for ``hf:`` and
        ``open_clip:``, those of the library's image processor or transforms).

    Example:
        >>> model = load_model("checkpoints/fmnist_supervised.safetensors")  # from the repository's root
        >>> model.pretrained_cfg["input_size"], model.num_classes, model.training
        ([1, 32, 32], 10, False)
    """
    if str(spec).startswith(LIBRARY_PREFIXES):
        return load_library_model(str(spec), **model_kwargs)
    path = Path(spec)
    if path.suffix == ".ckpt" or path.suffix in WEIGHT_SUFFIXES:
        if path.is_dir():
            raise IsADirectoryError(
                f"checkpoint {path} is a directory; expected a weights file or Lightning checkpoint"
            )
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        loader = _load_lightning_checkpoint if path.suffix == ".ckpt" else _load_weights_file
        try:
            return loader(path, architecture, model_kwargs)
        except (UserError, FileNotFoundError) as err:
            if str(path) in str(err):
                raise
            raise type(err)(f"checkpoint {path}: {err}") from err
        except Exception as err:  # safetensors header errors, unpickling errors, truncated zip files, missing keys
            raise UserError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err).strip()}); expected a "
                "safetensors/.pth weights file or a Lightning checkpoint of an attnprune module"
            ) from err
    if path.is_dir():
        raise IsADirectoryError(f"model {str(spec)!r} is a directory; expected a weights file, checkpoint or hub name")
    try:
        with offline_unless_hub_reachable():
            model = timm.create_model(str(spec), pretrained=True, **model_kwargs).eval()
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"{spec!r} is neither a file nor a timm model name") from err
        if "Invalid pretrained tag" in str(err):
            raise UserError(f"{spec!r}: {err}") from err
        raise _offline_error(spec, err) from err
    except Exception as err:  # no network, no cache: the hub download failed
        raise _offline_error(spec, err) from err
    check_finite(model.state_dict(), f"timm weights {str(spec)!r}")
    return model


def _offline_error(spec: str | Path, err: Exception) -> OSError:
    return HubUnavailableError(
        f"could not load timm weights {str(spec)!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        "Offline, pass a local file instead: load_model('weights.safetensors') for files saved by "
        "attnprune.save_model, or load_model('weights.pth', architecture='deit_small_patch16_224')"
    )


def save_model(
    model: nn.Module,
    path: str | Path,
    architecture: str,
    paradigm: str = "supervised",
    model_kwargs: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write ``model``'s weights as safetensors with its :func:`model_spec` (and ``extra`` fields) as metadata, so
    that :func:`load_model` rebuilds it from the file alone.

    Args:
        model: the timm model.
        path: the ``.safetensors`` file written (folders are created).
        architecture: its timm architecture name.
        paradigm: its training paradigm (:data:`attnprune.PARADIGMS`).
        model_kwargs: the timm ``create_model`` arguments it was built with.
        **extra: more metadata (a model card's fields).

    Returns:
        ``path``.

    Raises:
        UserError: what :func:`load_model` would refuse, before anything is written: a path not ending in
            ``.safetensors``, metadata that is not JSON, an unknown architecture or paradigm, weights that do not fit
            the model the spec rebuilds (the architecture, paradigm or ``model_kwargs`` do not describe ``model``) or
            that are not finite; a model that is not a timm model (``UserTypeError``).

    Example:
        >>> import tempfile, timm
        >>> kwargs = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10}
        >>> model = timm.create_model("vit_tiny_patch16_224", **kwargs)
        >>> path = tempfile.mkdtemp() + "/tiny.safetensors"
        >>> path = save_model(model, path, "vit_tiny_patch16_224", model_kwargs=kwargs)
        >>> loaded = load_model(path)  # the architecture and arguments come from the file
        >>> len(loaded.blocks), loaded.num_classes
        (2, 10)
    """
    path = Path(path)
    if path.suffix != ".safetensors":  # load_model reads other suffixes as state dicts without our metadata
        raise UserError(f"save_model writes safetensors files: {path} must end in .safetensors")
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "pretrained_cfg", None), dict):
        raise UserTypeError(f"save_model saves timm models (with a pretrained_cfg), got {type(model).__name__}")
    meta = {**model_spec(model, architecture, paradigm, model_kwargs), **extra}
    try:
        text = json.dumps(meta)
    except TypeError as err:
        raise UserError(f"save_model {path}: its metadata must be JSON (model_kwargs and extra fields): {err}") from err
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # what load_model would refuse is not written: the spec must rebuild a model these weights fit
    try:
        rebuilt = build_from_spec(meta)
    except UserError as err:
        raise UserError(f"save_model {path}: {err}") from err
    _check_fits(rebuilt, state, f"save_model {path}: the model given", architecture)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: text})
    return path
