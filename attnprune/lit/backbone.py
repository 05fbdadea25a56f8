"""The backbone every LightningModule of :mod:`attnprune.lit.modules` builds: one config object instead of the same
arguments repeated by every module.

In a LightningCLI YAML it is a mapping under the module's ``init_args``::

    model:
      class_path: attnprune.lit.modules.PrunedClassifier
      init_args:
        backbone: {model: vit_tiny_patch16_224, num_classes: 10, model_kwargs: {img_size: 32}}
        lr: 0.002

and on the command line ``--model.init_args.backbone.checkpoint PATH``. Each module has its own default (a supervised
DeiT-T for :class:`~attnprune.lit.modules.PrunedClassifier`, a distilled DeiT-T for
:class:`~attnprune.lit.modules.DistillationClassifier`, the checkpoint's architecture as a DINO backbone for the
probes); fields not given keep the module's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from attnprune.errors import UserError, UserTypeError
from attnprune.io import build_from_spec, build_model, load_model, model_spec
from attnprune.paradigms import get_paradigm

__all__ = ["Backbone"]


@dataclass(frozen=True)
class Backbone:
    """What builds a module's network (a timm ViT) and how it is pruned.

    Args:
        model: timm architecture name (``auto``: the one the checkpoint names).
        checkpoint: weights to start from: timm hub name, local weights file or Lightning checkpoint; None starts
            from random weights.
        paradigm: ``supervised``, ``distilled``, ``mae`` (average-pool readout) or ``dino`` (headless, read by a
            probe); recorded in the model spec of checkpoints. None takes the one the checkpoint records
            (``supervised`` without one); given, it must be the checkpoint's.
        num_classes: classes of the head; None keeps the checkpoint's or the architecture's. A checkpoint's trained
            head is replaced by a random one of other classes only with ``new_head``; a headless checkpoint gets a
            new head, and 0 reads its features without one.
        model_kwargs: timm ``create_model`` arguments (img_size, patch_size, depth, ...); with a checkpoint they
            complete or override those it records.
        pretrained_cfg: preprocessing of the model (timm's ``input_size``, ``mean``, ``std``, ``crop_pct``, ...)
            when it differs from the architecture's default (e.g. 1 x 28 x 28 Fashion-MNIST images).
        routing: routing of the network: a routing YAML path or dict, or a preset spec (``tome:r=13``); None keeps
            it unpruned.
        new_head: allow ``num_classes`` to replace the checkpoint's trained head by a random one (fine-tuning on
            other classes).
    """

    model: str = "deit_tiny_patch16_224"
    checkpoint: str | None = None
    paradigm: str | None = None
    num_classes: int | None = None
    model_kwargs: dict[str, Any] | None = None
    pretrained_cfg: dict[str, Any] | None = None
    routing: str | dict | None = None
    new_head: bool = False

    @classmethod
    def coerce(cls, value: Backbone | dict[str, Any]) -> Backbone:
        """``value`` as a :class:`Backbone`: a mapping of its fields (as checkpoints store it) is accepted too.

        Raises:
            TypeError: ``value`` is neither, or a mapping with keys that are not fields.
        """
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise UserTypeError(f"backbone must be a Backbone or a mapping of its fields, got {type(value).__name__}")
        unknown = sorted(set(value) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            fields = ", ".join(field.name for field in dataclasses.fields(cls))
            raise UserTypeError(f"backbone has no field {', '.join(unknown)} (its fields: {fields})")
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (what checkpoints and loggers store)."""
        return dataclasses.asdict(self)

    def build(self, spec: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """The network, unpruned, and the model spec that rebuilds it (see :func:`attnprune.io.model_spec`).

        Args:
            spec: a model spec stored by one of our checkpoints: the network is rebuilt from it (random weights,
                which the checkpoint's state dict then replaces) instead of from ``model`` and ``checkpoint``.

        Raises:
            ValueError: an unknown paradigm, ``model='auto'`` without a checkpoint, a paradigm other than the
                checkpoint's, or ``num_classes`` replacing its trained head without ``new_head``.
        """
        if self.paradigm is not None:
            get_paradigm(self.paradigm)
        extra = self.model_kwargs or {}
        paradigm = self.paradigm or "supervised"
        if spec is not None:
            network = build_from_spec(spec)
            architecture, kwargs, paradigm = spec["architecture"], spec["model_kwargs"], spec.get("paradigm", paradigm)
        elif self.checkpoint is not None:
            network = load_model(self.checkpoint, None if self.model == "auto" else self.model, **extra)
            loaded = getattr(network, "attnprune_spec", None) or {}
            paradigm = self._checkpoint_paradigm(loaded.get("paradigm"))
            self._check_head(network.num_classes)
            architecture = loaded.get("architecture", network.pretrained_cfg.get("architecture", self.model))
            kwargs = {**loaded.get("model_kwargs", {}), **extra}
        else:
            if self.model == "auto":
                raise UserError("model='auto' takes the architecture from a checkpoint, but none was given")
            kwargs = {**extra, **({"num_classes": self.num_classes} if self.num_classes is not None else {})}
            network = build_model(self.model, paradigm, self.pretrained_cfg, **kwargs)
            architecture = self.model
        if self.num_classes is not None and self.num_classes != network.num_classes:
            network.reset_classifier(self.num_classes)
        if spec is None and self.checkpoint is not None and self.pretrained_cfg:
            network.pretrained_cfg = {**network.pretrained_cfg, **self.pretrained_cfg}
        return network, model_spec(network, architecture, paradigm, kwargs)

    def _checkpoint_paradigm(self, recorded: str | None) -> str:
        """The paradigm of a network loaded from the checkpoint, which records ``recorded`` (None: a hub model or a
        plain state dict)."""
        if self.paradigm is not None and recorded is not None and self.paradigm != recorded:
            raise UserError(
                f"backbone.paradigm is {self.paradigm!r} but checkpoint {self.checkpoint} was trained as "
                f"{recorded!r}; leave paradigm unset to take the checkpoint's"
            )
        return self.paradigm or recorded or "supervised"

    def _check_head(self, classes: int) -> None:
        """Refuse ``num_classes`` replacing the checkpoint's trained ``classes``-class head by a random one, unless
        ``new_head`` asks for it (0, reading features, and a headless checkpoint discard nothing)."""
        if self.new_head or not classes or not self.num_classes or self.num_classes == classes:
            return
        raise UserError(
            f"backbone.num_classes is {self.num_classes} but checkpoint {self.checkpoint} has a trained "
            f"{classes}-class head, which {self.num_classes} classes would replace by a random one; set "
            "backbone.new_head true to fine-tune a new head, or leave num_classes unset"
        )
