"""scripts/make_checkpoints.py: every recipe's stages name existing configs and run on a stated accelerator."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_checkpoints", ROOT / "scripts" / "make_checkpoints.py")
make_checkpoints = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_checkpoints)

STAGES = [
    (recipe, name, index, configs)
    for recipe, models in make_checkpoints.RECIPES.items()
    for name, stages in models.items()
    for index, configs in enumerate(stages)
]


def test_every_recipe_trains_every_model():
    for recipe, models in make_checkpoints.RECIPES.items():
        assert set(models) == set(make_checkpoints.MODELS), recipe


@pytest.mark.parametrize("recipe,name,index,configs", STAGES, ids=[f"{r}-{n}-{i}" for r, n, i, _ in STAGES])
def test_stage_configs_exist_and_name_an_accelerator(recipe, name, index, configs):
    merged: dict = {}
    for config in configs:
        path = make_checkpoints.CONFIGS / config
        assert path.is_file(), path
        merged.update(yaml.safe_load(path.read_text()).get("trainer", {}))
    assert merged.get("accelerator") in ("cpu", "gpu")


def test_stage_command_passes_configs_in_order_and_extra_arguments_last():
    command = make_checkpoints.stage_command(
        "dino", 0, ["dino_pretrain.yaml", "gpu/dino_pretrain.yaml"], ["--trainer.max_time", "00:00:01:00"]
    )
    assert command == [
        "python", "train.py", "fit",
        "--config", "configs/fashion_mnist/dino_pretrain.yaml",
        "--config", "configs/fashion_mnist/gpu/dino_pretrain.yaml",
        "--checkpoint.dirpath", "runs/fmnist-dino/stage0",
        "--trainer.max_time", "00:00:01:00",
    ]  # fmt: skip


def test_cards_name_the_cpu_cores_of_the_machine_that_trained():
    assert make_checkpoints.this_machine().endswith(f"{os.cpu_count()} CPU cores")
