"""The LightningCLI behind ``train.py`` and ``evaluate.py``: YAML configs, W&B by default (offline without an API
key or a server that answers: :mod:`~attnprune.lit.wandb_setup`), checkpoints (``last.ckpt`` for ``--ckpt_path``
resuming: :mod:`~attnprune.lit.resume`), learning-rate monitor and progress bar.

The resolved config (model, data, trainer, callbacks, with every routing written out as its rules) is each run's
hyper-parameters in every logger (the W&B run's config), and is saved as ``lightning_config.yaml`` inside the run's
own folder (the W&B run's ``files/``, synced with it), never over another run's."""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from torch.optim import Optimizer

from attnprune.errors import UserError
from attnprune.lit.callbacks import FlopsModelSummary
from attnprune.lit.data import ImageDataModule
from attnprune.lit.optim import GROUPS, ConfigurableOptimizers, class_of
from attnprune.lit.resume import LatestCheckpoint, continue_csv_logs
from attnprune.lit.seeding import SeededBatches
from attnprune.lit.wandb_setup import prepare_wandb, wandb_offline
from attnprune.routing import Routing

__all__ = [
    "AttnpruneCLI",
    "RunConfigCallback",
    "discard_failed_run",
    "existing_folders",
    "prepare_wandb",
    "quiet_console",
    "wandb_offline",
    "trainer_defaults",
]

CONFIG_FILE = "lightning_config.yaml"


def _routing_entry(spec: Any, depth: int) -> Any:
    """A routing spec as the run config holds it: its rules, with the spec it came from."""
    try:
        routing = Routing.parse(spec, depth)
    except (ValueError, TypeError, FileNotFoundError):
        return spec  # the run fails on it later, with the full message
    return {"spec": spec if isinstance(spec, str) else routing.name, **routing.to_dict()}


def resolved_config(parser: LightningArgumentParser, config: Any, pl_module: L.LightningModule | None) -> dict:
    """The CLI's config as a plain dict, every routing (``model.init_args.backbone.routing``, evaluate.py's
    ``routings``) written out as its rules."""
    resolved = yaml.safe_load(parser.dump(config, skip_none=False))
    resolved.pop("config", None)
    backbone = getattr(pl_module, "backbone", None)
    depth = len(backbone.blocks) if backbone is not None and hasattr(backbone, "blocks") else 12
    init_args = (resolved.get("model") or {}).get("init_args") or {}
    module_backbone = init_args.get("backbone") if isinstance(init_args, dict) else None
    if isinstance(module_backbone, dict) and "routing" in module_backbone:
        module_backbone["routing"] = _routing_entry(module_backbone["routing"], depth)
    if isinstance(resolved.get("routings"), list):
        resolved["routings"] = [_routing_entry(spec, depth) for spec in resolved["routings"]]
    return resolved


class RunConfigCallback(SaveConfigCallback):
    """Makes the resolved config every logger's hyper-parameters (the W&B run's config) and saves it as
    ``lightning_config.yaml`` in the run's own folder: the W&B run's ``files/`` (synced with the run), else the
    logger's versioned ``log_dir``; a name already taken gets a numbered suffix, so no run's file is overwritten.

    Lightning's own logging of the module's and data module's flat hyper-parameters is switched off: the config
    holds them, nested under ``model`` and ``data``, and they would otherwise overwrite its top-level keys.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.loggers:
            pl_module._log_hyperparams = False
            if trainer.datamodule is not None:
                trainer.datamodule._log_hyperparams = False
        if not self.already_saved and not any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            self.log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every process asks
        super().setup(trainer, pl_module, stage)

    def run_dir(self, trainer: L.Trainer) -> Path:
        """The W&B run's ``files/`` folder, else the logger's ``log_dir`` (rank zero only)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                return Path(logger.experiment.dir)
        return Path(self.log_dir)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = resolved_config(self.parser, self.config, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
        folder = self.run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path, n = folder / CONFIG_FILE, 1
        while path.exists():
            path, n = folder / f"{Path(CONFIG_FILE).stem}-{n}.yaml", n + 1
        self.parser.save(self.config, str(path), skip_none=False, multifile=False)
        self.saved_path = path


class LoggedLearningRateMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, idle without a logger (``--trainer.logger false``) instead of failing
    the run: there is nothing to log the learning rate to."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def _run_roots(trainer: L.Trainer) -> list[Path]:
    """The folders a run writes under: the trainer's root, every logger's save folder, the checkpoint folders."""
    roots = [Path(trainer.default_root_dir)]
    roots += [Path(logger.save_dir) for logger in trainer.loggers if logger.save_dir]
    roots += [Path(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    return roots


def existing_folders(trainer: L.Trainer) -> set[Path]:
    """The run's root folders and their parents that exist now, before the run (see :func:`discard_failed_run`)."""
    return {p for root in _run_roots(trainer) for p in (root.absolute(), *root.absolute().parents) if p.exists()}


def discard_failed_run(trainer: L.Trainer, existed: set[Path]) -> list[Path]:
    """After a failed run that saved no checkpoint, remove what it created for its loggers: the W&B run folder
    (finished first) and its dangling ``latest-run``/``debug*.log`` links, a CSV/TensorBoard logger's version
    folder, the saved config, then every parent left empty that did not exist before the run (``existed``, from
    :func:`existing_folders`). A run that saved a checkpoint keeps everything, so it can be resumed.

    Returns:
        The paths removed (rank zero; other ranks remove nothing).
    """
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if not trainer.is_global_zero or any(cb.last_model_path or cb.best_model_path for cb in checkpoints):
        return []
    paths = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            if logger._experiment is not None:  # created by this run (never create it here)
                run_dir = Path(logger.experiment.dir).parent
                logger.experiment.finish(exit_code=1)
                paths.append(run_dir)
        elif logger.log_dir is not None:
            paths.append(Path(logger.log_dir))
    paths += [cb.saved_path for cb in trainer.callbacks if getattr(cb, "saved_path", None) is not None]
    removed = []
    for path in (p.absolute() for p in paths):
        if path in existed or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            for link in path.parent.iterdir():  # W&B's latest-run and debug*.log links into the run folder
                if link.is_symlink() and not link.exists():
                    link.unlink()
        else:
            path.unlink()
        removed.append(path)
        parent = path.parent
        while parent not in existed and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            removed.append(parent)
            parent = parent.parent
    return removed


def trainer_defaults(project: str = "attnprune") -> dict[str, Any]:
    """Trainer defaults of the entry points; every one can be overridden in YAML or on the command line. The root
    folder is ``runs/``, where checkpoints and the saved config go without a logger (``--trainer.logger false``): the
    working directory's ``checkpoints/`` is, at the repository's top, the folder of the shipped models."""
    return {
        "logger": lazy_instance(WandbLogger, project=project, save_dir="runs", offline=wandb_offline()),
        "default_root_dir": "runs",
    }


class _NoTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger"): nothing a user acts on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_console() -> None:
    """No console lines a user cannot act on: Lightning's tips, and the deprecation warning Lightning's own pytree
    code raises under newer torch."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _without_groups(args: list[str]) -> list[str]:
    """The command line without the ``optimizer`` and ``lr_scheduler`` options and ``--print_config``: what
    :class:`AttnpruneCLI` parses first, to learn the module whose optimizer those options default to."""
    kept, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name == "--print_config" or any(name == f"--{g}" or name.startswith(f"--{g}.") for g in GROUPS):
            skip_value = "=" not in arg and name != "--print_config"
            continue
        kept.append(arg)
    return kept


class AttnpruneCLI(LightningCLI):
    """LightningCLI over any of attnprune's LightningModules and DataModules (``class_path`` / ``init_args``), seeded
    (``seed_everything`` 0 unless given) and with a quiet console.

    ``fit``'s ``optimizer`` and ``lr_scheduler`` groups (LightningCLI's own) default to the module's declared optimizer
    and schedule with its arguments filled in (:class:`~attnprune.lit.optim.ConfigurableOptimizers`), so the logged
    config shows what trains, and ``--optimizer SGD`` keeps the module's learning rate, weight decay and warm-up unless
    given. The module builds its parameter groups and trains with the groups' choice; a module argument left at its
    default takes the value the group gives (``--optimizer.lr 0.1`` sets ``model.init_args.lr`` too), one set to
    another value than the group's is an error.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_console()
        kwargs.setdefault("auto_configure_optimizers", False)  # the groups are added and applied here
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(
            L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's, without its warning about ``args`` beside ``sys.argv`` (the entry points always pass the command
        line themselves, without ``--debug``, so it would fire on every command). With ``fit``'s optimizer groups, the
        command line is parsed twice: without the groups' options first, to learn the module, whose declared optimizer
        and schedule become the groups' defaults; then as given."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            fit = getattr(self, "_subcommand_parsers", {}).get("fit")
            if fit is None or "optimizer" not in fit._optimizers:
                super().parse_arguments(parser, args)
                return
            args = sys.argv[1:] if args is None else args
            try:
                super().parse_arguments(parser, _without_groups(args) if isinstance(args, list) else args)
            except ArgumentError:  # the parse below reports it, or needs no module (--print_config of a partial config)
                self.config = Namespace()
            if self.config.get("subcommand") == "fit":
                model = self.config.fit.model
                module = class_of(model.class_path) if isinstance(model.get("class_path"), str) else None
                if isinstance(module, type) and issubclass(module, ConfigurableOptimizers):
                    defaults = module.default_optimization(model.init_args.as_dict())
                    if defaults:
                        fit.set_defaults(defaults)
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """``fit``: the module's arguments made to agree with the optimizer and schedule chosen
        (:meth:`~attnprune.lit.optim.ConfigurableOptimizers.align_arguments`)."""
        if self.subcommand == "fit" and "optimizer" in self.config.fit:
            module = class_of(self.config.fit.model.class_path)
            if issubclass(module, ConfigurableOptimizers):
                module.align_arguments(self.config.fit.model.init_args, self._chosen_optimization())

    def after_instantiate_classes(self) -> None:
        """``fit``: the module trains with the optimizer and schedule of the config."""
        if self.subcommand != "fit" or "optimizer" not in self.config.fit:
            return
        chosen = self._chosen_optimization()
        if isinstance(self.model, ConfigurableOptimizers):
            self.model.set_optimization(**chosen)
        elif any(chosen.values()):
            raise UserError(
                f"{type(self.model).__name__} configures its own optimizers: --optimizer and --lr_scheduler apply to "
                "attnprune's modules"
            )

    def _chosen_optimization(self) -> dict[str, dict | None]:
        """``fit``'s ``optimizer`` and ``lr_scheduler`` as plain dicts."""
        chosen = {group: self.config.fit.get(group) for group in GROUPS}
        return {group: value.as_dict() if hasattr(value, "as_dict") else value for group, value in chosen.items()}

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's trainer, its default model summary replaced by one with attnprune's FLOPs."""
        trainer = super().instantiate_trainer(**kwargs)
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) in (ModelSummary, RichModelSummary):
                summary = FlopsModelSummary(max_depth=callback._max_depth, **callback._summarize_kwargs)
                trainer.callbacks[i] = summary
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a run that fails before saving a checkpoint leaves no logger folders (:func:`discard_failed_run`)."""
        existed = existing_folders(self.trainer)
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand == "fit" else None
        if ckpt_path:
            existed |= continue_csv_logs(self.trainer, ckpt_path)
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # its own
            # attnprune's data modules resume their training order themselves (their state_dict), unless streamed
            if isinstance(self.datamodule, ImageDataModule) and not getattr(self.datamodule, "streaming", False):
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        prepare_wandb(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            discard_failed_run(self.trainer, existed)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Checkpointing (``--checkpoint.*``, keeps ``last.ckpt`` for resuming, rewritten every 200 steps and at every
        epoch end), seeded training steps (``--seeding.*``: a resumed run draws what an uninterrupted one draws), a
        learning-rate monitor, and LightningCLI's ``optimizer`` and ``lr_scheduler`` groups (applied by the module,
        not by LightningCLI)."""
        parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.last_every_n_steps": 200})
        parser.add_lightning_class_args(SeededBatches, "seeding")
        parser.add_lightning_class_args(LoggedLearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
