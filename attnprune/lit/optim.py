"""Optimizers and learning-rate schedules of the LightningModules that train.

A module that trains declares its optimizer and schedule in the form of LightningCLI's ``optimizer`` and
``lr_scheduler`` groups (``class_path``, ``init_args``), with values taken from its own arguments where it has them
(:class:`FromArgument`): :class:`~attnprune.lit.modules.PrunedClassifier` trains with AdamW at its ``lr`` and
``weight_decay`` and with :class:`WarmupCosine` over its ``warmup_epochs``. Under
:class:`~attnprune.lit.cli.AttnpruneCLI` this declaration is the groups' default, so ``--optimizer SGD`` keeps the
module's learning rate, weight decay and warm-up, and the logged config shows what trains. The module itself builds
the parameter groups the optimizer gets (no weight decay on biases and norms; layer-wise learning-rate decay).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class

from attnprune.errors import UserError, check_number

__all__ = [
    "GROUPS",
    "RANGES",
    "WARMUP_COSINE",
    "ConfigurableOptimizers",
    "FromArgument",
    "WarmupCosine",
    "adamw_warmup_cosine",
    "class_of",
    "cosine",
    "steps_per_epoch",
]

GROUPS = ("optimizer", "lr_scheduler")
WARMUP_COSINE = f"{__name__}.WarmupCosine"
_POSITIVE, _AT_LEAST_ZERO, _COUNT = {"low": 0, "low_open": True}, {"low": 0}, {"low": 1, "integer": True}
_FRACTION = {"low": 0, "high": 1, "high_open": True}
RANGES: dict[str, dict[str, Any]] = {
    "lr": _AT_LEAST_ZERO,  # 0 trains nothing, as a test of the loop may want
    "weight_decay": _AT_LEAST_ZERO,
    "warmup_epochs": _AT_LEAST_ZERO,
    "mixup": _AT_LEAST_ZERO,
    "cutmix": _AT_LEAST_ZERO,
    "layer_decay": {"low": 0, "high": 1, "low_open": True},
    "label_smoothing": _FRACTION,
    "momentum": _FRACTION,
    "mask_ratio": _FRACTION,
    "center_momentum": {"low": 0, "high": 1},
    "ema_momentum": {"low": 0, "high": 1},
    "temperature": _POSITIVE,
    "student_temp": _POSITIVE,
    "teacher_temp": _POSITIVE,
    "warmup_teacher_temp": _POSITIVE,
    "warmup_teacher_temp_epochs": {"low": 0, "integer": True},
    "num_classes": _COUNT,
    "n_last_blocks": _COUNT,
    "k": _COUNT,
}
"""The range of each module argument of that name (:func:`~attnprune.errors.check_number`'s bounds; None, where an
argument may be None, is left to the module)."""


def cosine(step: float, total: float, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total`` and after)."""
    progress = min(step / total, 1.0) if math.isfinite(total) and total > 0 else 0.0
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps per epoch (gradient accumulation included)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        trainer.fit_loop.setup_data()  # what Trainer.estimated_stepping_batches does when the loader is not set up
        batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise UserError("warmup_epochs needs a train dataloader with a length; set warmup_epochs=0")
    return math.ceil(batches / trainer.accumulate_grad_batches)


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup_epochs``, then cosine decay to zero at ``total_steps``; stepped every optimizer
    step.

    Args:
        optimizer: the optimizer.
        warmup_epochs: warm-up length in epochs (may be fractional).
        steps_per_epoch: optimizer steps per epoch; None: the trainer's (attnprune's modules fill it in).
        total_steps: optimizer steps of the whole training; None: the trainer's (``estimated_stepping_batches``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_epochs: float = 0.0,
        steps_per_epoch: int | None = None,
        total_steps: float | None = None,
    ) -> None:
        if warmup_epochs > 0 and steps_per_epoch is None:
            raise UserError("WarmupCosine with warmup_epochs > 0 needs steps_per_epoch")
        self.warmup_steps = round(warmup_epochs * steps_per_epoch) if warmup_epochs > 0 else 0
        self.total_steps = math.inf if total_steps is None else total_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the peak."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return cosine(step - self.warmup_steps, self.total_steps - self.warmup_steps, 1.0, 0.0)


@dataclass(frozen=True)
class FromArgument:
    """An ``init_args`` value of a module's declared optimizer or schedule: the module's argument ``name``."""

    name: str


def adamw_warmup_cosine(**fixed: Any) -> dict[str, dict[str, Any]]:
    """AdamW at the module's ``lr`` and ``weight_decay`` (and ``fixed`` arguments, e.g. ``betas``), then
    :class:`WarmupCosine` over its ``warmup_epochs``: the declaration of most modules."""
    optimizer = {"lr": FromArgument("lr"), "weight_decay": FromArgument("weight_decay"), **fixed}
    return {
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": optimizer},
        "lr_scheduler": {
            "class_path": WARMUP_COSINE,
            "init_args": {"warmup_epochs": FromArgument("warmup_epochs")},
        },
    }


def class_of(class_path: str) -> type:
    """The class a ``class_path`` (``package.module.Name``) names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _signature_default(cls: type, name: str) -> Any:
    """The default of ``cls``'s argument ``name``, looked up along the classes whose ``__init__`` passes it on."""
    for klass in cls.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return inspect.Parameter.empty


class ConfigurableOptimizers:
    """Mixin (before ``LightningModule``) of the modules that train: ``configure_optimizers`` builds the optimizer and
    schedule that :meth:`set_optimization` chose, else the ones the class declares in ``optimization``.

    A subclass sets ``optimization`` (``{"optimizer": spec, "lr_scheduler": spec}``, each spec a ``class_path`` and
    ``init_args`` in which :class:`FromArgument` values come from the module's arguments; None: nothing trains) and
    implements :meth:`optimizer_groups`.
    """

    optimization: ClassVar[dict[str, dict[str, Any]] | None] = None
    _chosen: dict[str, dict[str, Any] | None] | None = None

    def check_hyperparameters(self) -> None:
        """Refuse a saved hyper-parameter outside its :data:`RANGES` (a negative weight decay, a layer decay above
        1, ...), before any network is built.

        Raises:
            UserError: ``<Module> <argument> must be <range>, got <value>``.
        """
        for name, value in self.hparams.items():
            if name in RANGES and value is not None:
                check_number(f"{type(self).__name__} {name}", value, **RANGES[name])

    @classmethod
    def default_optimization(cls, arguments: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
        """The declared optimizer and schedule, with the module's ``arguments`` filled in."""
        if cls.optimization is None:
            return None
        return {
            group: {
                "class_path": spec["class_path"],
                "init_args": {
                    key: arguments[value.name] if isinstance(value, FromArgument) else value
                    for key, value in spec["init_args"].items()
                },
            }
            for group, spec in cls.optimization.items()
        }

    @classmethod
    def _links(cls) -> Iterator[tuple[str, str, str]]:
        for group, spec in (cls.optimization or {}).items():
            for key, value in spec["init_args"].items():
                if isinstance(value, FromArgument):
                    yield value.name, group, key

    @classmethod
    def align_arguments(cls, arguments: MutableMapping[str, Any], chosen: Mapping[str, Mapping | None]) -> None:
        """Make the module's ``arguments`` agree with the ``chosen`` optimizer and schedule: an argument left at the
        class's default takes the value the group gives (the module's hyper-parameters then record what trains).

        Raises:
            UserError: an argument set away from its default that the group contradicts (given twice).
        """
        for name, group, key in cls._links():
            spec = chosen.get(group)
            init_args = (spec or {}).get("init_args") or {}
            if key not in init_args or init_args[key] == arguments[name]:
                continue
            if arguments[name] != _signature_default(cls, name):
                raise UserError(
                    f"{group}.init_args.{key} is {init_args[key]!r} but model.init_args.{name} is "
                    f"{arguments[name]!r}: give it once (the module's {name} is the {group}'s default)"
                )
            arguments[name] = init_args[key]

    def set_optimization(self, optimizer: dict[str, Any] | None, lr_scheduler: dict[str, Any] | None) -> None:
        """Train with ``optimizer`` and ``lr_scheduler`` (``class_path`` / ``init_args``, as LightningCLI's groups
        give them; a WarmupCosine's step counts left None come from the trainer) instead of the declared ones."""
        self._chosen = {"optimizer": optimizer, "lr_scheduler": lr_scheduler}

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The parameter groups to optimize, given the optimizer's ``weight_decay``; a group's ``lr_scale`` scales
        its learning rate."""
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        chosen = self._chosen or self.default_optimization(self.hparams)
        if chosen is None or chosen["optimizer"] is None:
            return None
        spec = chosen["optimizer"]
        weight_decay = (spec.get("init_args") or {}).get("weight_decay", 0.0)
        optimizer = instantiate_class(self.optimizer_groups(weight_decay), spec)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if chosen["lr_scheduler"] is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": _scheduler_config(optimizer, chosen["lr_scheduler"], self)}


def _scheduler_config(optimizer: torch.optim.Optimizer, spec: Mapping[str, Any], module: L.LightningModule) -> dict:
    """Lightning's scheduler config for ``spec``: a :class:`WarmupCosine` gets its step counts from the trainer and
    steps every optimizer step; any other scheduler steps every epoch, as Lightning's CLI steps it."""
    init_args = dict(spec.get("init_args") or {})
    interval = "epoch"
    if issubclass(class_of(spec["class_path"]), WarmupCosine):
        interval = "step"
        if init_args.get("total_steps") is None:
            init_args["total_steps"] = module.trainer.estimated_stepping_batches
        if init_args.get("warmup_epochs", 0.0) > 0 and init_args.get("steps_per_epoch") is None:
            init_args["steps_per_epoch"] = steps_per_epoch(module.trainer)
    scheduler = instantiate_class(optimizer, {"class_path": spec["class_path"], "init_args": init_args})
    config = {"scheduler": scheduler, "interval": interval}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = getattr(scheduler, "monitor", None)  # Lightning's ReduceLROnPlateau names it
    return config
