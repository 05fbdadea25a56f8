"""scripts/make_checkpoints.py: every recipe's stages name existing configs, run on a stated accelerator and parse as
train.py arguments; the model cards record the commands the recipes give."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_checkpoints", ROOT / "scripts" / "make_checkpoints.py")
make_checkpoints = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_checkpoints)

STAGES = [
    (recipe, name, index, stage)
    for recipe, models in make_checkpoints.RECIPES.items()
    for name, stages in models.items()
    for index, stage in enumerate(stages)
]


def test_every_recipe_trains_every_model():
    for recipe, models in make_checkpoints.RECIPES.items():
        assert set(models) == set(make_checkpoints.MODELS), recipe


def resolved_config(command: list[str]) -> dict:
    """The config train.py resolves from ``command`` (``python train.py fit ...``), without running it."""
    from attnprune.cli import lightning_parser_kwargs
    from attnprune.lit.cli import AttnpruneCLI

    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        AttnpruneCLI(args=[*command[2:], "--print_config"], parser_kwargs=lightning_parser_kwargs())
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("recipe,name,index,stage", STAGES, ids=[f"{r}-{n}-{i}" for r, n, i, _ in STAGES])
def test_stage_configs_exist_and_name_an_accelerator(recipe, name, index, stage):
    for config in stage.configs:
        assert (make_checkpoints.CONFIGS / config).is_file(), config
    config = resolved_config(make_checkpoints.stage_command(name, index, stage, []))
    assert config["trainer"]["accelerator"] in ("cpu", "gpu")
    assert config["checkpoint"]["dirpath"] == f"runs/fmnist-{name}/stage{index}"


def test_a_warm_restart_starts_from_the_stage_before_with_the_shape_of_its_checkpoint():
    stage = make_checkpoints.RECIPES["cpu"]["supervised"][3]
    config = resolved_config(make_checkpoints.stage_command("supervised", 3, stage, []))
    assert config["model"]["init_args"]["backbone"] == {
        "model": "auto",
        "checkpoint": "runs/fmnist-supervised/stage2/last.ckpt",
        "paradigm": None,
        "num_classes": 10,
        "model_kwargs": None,
        "pretrained_cfg": None,
        "routing": None,
        "new_head": False,
    }
    assert config["model"]["init_args"]["lr"] == 0.0005 and config["trainer"]["max_epochs"] == 10
    gpu = resolved_config(
        make_checkpoints.stage_command("supervised", 2, make_checkpoints.RECIPES["cpu"]["supervised"][2], [])
    )
    assert (gpu["trainer"]["accelerator"], gpu["trainer"]["devices"], gpu["trainer"]["max_epochs"]) == ("gpu", 1, 20)


@pytest.mark.parametrize("name", sorted(make_checkpoints.MODELS))
def test_model_cards_record_the_commands_of_their_recipe(name):
    card = json.loads((ROOT / "checkpoints" / f"fmnist_{name}.json").read_text())
    recipe = card["export_command"].split("--recipe ")[1]
    stages = make_checkpoints.RECIPES[recipe][name]
    for index, (stage, recorded) in enumerate(zip(stages, card["commands"], strict=True)):
        command = make_checkpoints.stage_command(name, index, stage, [])
        assert shlex.split(recorded)[: len(command)] == command  # extra arguments (time limits, loggers) may follow
    assert all(command in (ROOT / "checkpoints" / f"fmnist_{name}.md").read_text() for command in card["commands"])


def test_stage_command_passes_configs_in_order_then_options_and_extra_arguments_last():
    stage = make_checkpoints.Stage(("dino_pretrain.yaml", "gpu/dino_pretrain.yaml"), {"trainer.max_epochs": "3"})
    command = make_checkpoints.stage_command("dino", 0, stage, ["--trainer.max_time", "00:00:01:00"])
    assert command == [
        "python", "train.py", "fit",
        "--config", "configs/fashion_mnist/dino_pretrain.yaml",
        "--config", "configs/fashion_mnist/gpu/dino_pretrain.yaml",
        "--trainer.max_epochs", "3",
        "--checkpoint.dirpath", "runs/fmnist-dino/stage0",
        "--trainer.max_time", "00:00:01:00",
    ]  # fmt: skip


def test_cards_name_the_cpu_cores_of_the_machine_that_trained():
    assert make_checkpoints.this_machine().endswith(f"{os.cpu_count()} CPU cores")
