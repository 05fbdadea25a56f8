"""Optimizers and schedules: the module's own by default, LightningCLI's ``optimizer`` / ``lr_scheduler`` groups on
the command line, and the logged config showing what trains."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from attnprune.cli import lightning_parser_kwargs
from attnprune.errors import UserError
from attnprune.lit.cli import AttnpruneCLI
from attnprune.lit.optim import WarmupCosine
from tests.conftest import TINY_BACKBONE, make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def cli(folder, tmp_path, *extra: str, module: tuple[str, ...] = ()) -> AttnpruneCLI:
    """``train.py fit`` in this process for one optimizer step of the tiny classifier (or ``module``: its class and
    arguments), logged with a CSVLogger."""
    classifier = ("attnprune.lit.modules.PrunedClassifier", "--model.init_args.backbone", json.dumps(TINY_BACKBONE))
    args = {
        "data.class_path": "attnprune.lit.data.ImageFolderDataModule",
        "data.init_args.root": str(folder),
        "data.init_args.cache_dir": str(folder.parent / "hf"),
        "data.init_args.batch_size": "4",
        "data.init_args.val_size": "4",
        "trainer.accelerator": "cpu",
        "trainer.logger": "lightning.pytorch.loggers.CSVLogger",
        "trainer.logger.save_dir": str(tmp_path),
        "trainer.max_steps": "1",
        "trainer.limit_train_batches": "1",
        "trainer.log_every_n_steps": "1",
        "trainer.limit_val_batches": "0",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
    }
    argv = ["fit", "--model", *(module or classifier), *[x for key, value in args.items() for x in (f"--{key}", value)]]
    return AttnpruneCLI(args=[*argv, *extra], parser_kwargs=lightning_parser_kwargs())


def logged_config(tmp_path) -> dict:
    """The config the CSV logger received as hyper-parameters (the same dict every logger gets)."""
    (path,) = tmp_path.glob("version_*/hparams.yaml")
    return yaml.safe_load(path.read_text())


def test_warmup_cosine_by_hand():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_epochs=1.5, steps_per_epoch=2, total_steps=7)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    cosine = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, *cosine])  # round(1.5 * 2) warm-up steps, then 4 of cosine to 0
    with pytest.raises(UserError, match="warmup_epochs > 0 needs steps_per_epoch"):
        WarmupCosine(optimizer, warmup_epochs=1.0)


def test_by_default_the_module_trains_with_its_own_optimizer_and_the_config_shows_it(folder, tmp_path):
    module_args = ["--model.init_args.lr", "0.002", "--model.init_args.weight_decay", "0.01"]
    run = cli(folder, tmp_path, *module_args, "--model.init_args.warmup_epochs", "2")
    (optimizer,) = run.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW and run.trainer.global_step == 1
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (0.002, 0.01)
    # no weight decay on biases, norms, position embedding and class token (timm's groups)
    decays = {group["weight_decay"]: group["params"] for group in optimizer.param_groups}
    assert sorted(decays) == [0.0, 0.01] and any(p is run.model.model.pos_embed for p in decays[0.0])
    (scheduler,) = run.trainer.lr_scheduler_configs
    assert type(scheduler.scheduler) is WarmupCosine and scheduler.interval == "step"
    assert scheduler.scheduler.warmup_steps == 2 and scheduler.scheduler.total_steps == 1  # 1 step per epoch
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * 2 / 2)  # after the first step: 2 of 2 warm-up

    config = logged_config(tmp_path)
    assert config["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert (config["optimizer"]["init_args"]["lr"], config["optimizer"]["init_args"]["weight_decay"]) == (0.002, 0.01)
    assert config["lr_scheduler"]["class_path"] == "attnprune.lit.optim.WarmupCosine"
    assert config["lr_scheduler"]["init_args"]["warmup_epochs"] == 2


def test_optimizer_on_the_command_line_trains_and_keeps_the_modules_settings(folder, tmp_path):
    module_args = ["--model.init_args.lr", "0.002", "--model.init_args.weight_decay", "0.01"]
    run = cli(folder, tmp_path, *module_args, "--optimizer", "SGD", "--optimizer.momentum", "0.9")
    (optimizer,) = run.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and run.trainer.global_step == 1
    assert optimizer.defaults["momentum"] == 0.9
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (0.002, 0.01)  # the module's
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 0.01]
    assert type(run.trainer.lr_scheduler_configs[0].scheduler) is WarmupCosine  # the module's schedule is kept
    config = logged_config(tmp_path)
    assert config["optimizer"]["class_path"] == "torch.optim.SGD"
    assert {k: config["optimizer"]["init_args"][k] for k in ("lr", "weight_decay", "momentum")} == {
        "lr": 0.002,
        "weight_decay": 0.01,
        "momentum": 0.9,
    }
    assert config["lr_scheduler"]["class_path"] == "attnprune.lit.optim.WarmupCosine"


def test_a_group_value_given_alone_becomes_the_modules_and_a_scheduler_steps_per_epoch(folder, tmp_path):
    run = cli(folder, tmp_path, "--optimizer.lr", "0.1", "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "3")
    (optimizer,) = run.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["lr"] == 0.1
    assert optimizer.defaults["weight_decay"] == 0.05  # PrunedClassifier's default
    (scheduler,) = run.trainer.lr_scheduler_configs
    assert type(scheduler.scheduler) is torch.optim.lr_scheduler.StepLR and scheduler.interval == "epoch"
    assert run.model.hparams.lr == 0.1  # the module's hyper-parameters record what trained
    config = logged_config(tmp_path)
    assert config["model"]["init_args"]["lr"] == config["optimizer"]["init_args"]["lr"] == 0.1
    assert config["lr_scheduler"] == {
        "class_path": "torch.optim.lr_scheduler.StepLR",
        "init_args": {"step_size": 3, "gamma": 0.1, "last_epoch": -1},
    }


def test_a_learning_rate_given_twice_is_an_error(folder, tmp_path):
    with pytest.raises(UserError, match=r"optimizer.init_args.lr is 0.1 but model.init_args.lr is 0.002: give it once"):
        cli(folder, tmp_path, "--model.init_args.lr", "0.002", "--optimizer.lr", "0.1")
    assert not list(tmp_path.iterdir())  # refused before any run started


@pytest.mark.parametrize(
    ("model", "optimizer"),
    [
        (
            ["attnprune.lit.pretraining.MAEPretraining", "--model.init_args.model", "vit_tiny_patch16_224"],
            {"class_path": "torch.optim.AdamW", "lr": 0.001, "weight_decay": 0.05, "betas": [0.9, 0.95]},
        ),
        (
            ["attnprune.lit.modules.LinearProbe", "--model.init_args.num_classes", "3"],
            {"class_path": "torch.optim.SGD", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9},
        ),
    ],
)
def test_print_config_shows_each_modules_optimizer(folder, tmp_path, capsys, model, optimizer):
    with pytest.raises(SystemExit):
        cli(folder, tmp_path, "--print_config", module=model)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"class_path": printed["optimizer"]["class_path"], **printed["optimizer"]["init_args"]}.items() >= (
        optimizer.items()
    )
    assert printed["lr_scheduler"]["class_path"] == "attnprune.lit.optim.WarmupCosine"
