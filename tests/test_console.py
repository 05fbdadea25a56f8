"""A quiet, informative console: no command of the README prints a warning on a fresh install, `fit` shows
validation top-1 in its progress bar and attnprune's FLOPs in the model summary, and selectivity keys sort by layer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from attnprune.lit.callbacks import layer_key
from attnprune.lit.modules import PrunedClassifier
from tests.conftest import TINY_BACKBONE, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # a fresh install: no W&B key
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r"\bwarning\b|\btip:", line, re.IGNORECASE)]


ENTRY_POINTS = [["train.py", "fit"], ["evaluate.py"], ["search.py"], ["analyze.py"], ["quickstart.py"]]


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_help_of_every_entry_point_prints_no_warning(command, tmp_path):
    result = run([str(ROOT / command[0]), *command[1:], "--help"], tmp_path)
    assert "usage" in result.stdout.lower() and warnings_in(result.stderr) == []


def test_a_tiny_fit_prints_no_warning_and_shows_validation_top1_and_flops(tmp_path):
    make_image_folder(tmp_path / "data")
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "attnprune-test", "save_dir": str(tmp_path / "runs")},
            },
        },
        "model": {"class_path": "attnprune.lit.modules.PrunedClassifier", "init_args": {"backbone": TINY_BACKBONE}},
        "data": {
            "class_path": "attnprune.lit.data.ImageFolderDataModule",
            "init_args": {"root": str(tmp_path / "data"), "batch_size": 4, "val_size": 6, "cache_dir": str(tmp_path)},
        },
        "checkpoint": {"dirpath": str(tmp_path / "checkpoints")},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    result = run([str(ROOT / "train.py"), "fit", "--config", "train.yaml"], tmp_path)
    assert warnings_in(result.stderr) == [], result.stderr
    assert "val/top1" in result.stdout  # in the progress bar
    flops = get_human_readable_count(round(PrunedClassifier(TINY_BACKBONE).gflops() * 1e9))
    assert f"Total FLOPs: {flops}" in result.stdout and flops != "0"


def test_selectivity_keys_sort_by_layer():
    keys = [layer_key(layer, 12) for layer in range(12)]
    assert keys[:3] == ["layer_00", "layer_01", "layer_02"] and sorted(keys) == keys
    assert [layer_key(layer, 4) for layer in range(4)] == ["layer_0", "layer_1", "layer_2", "layer_3"]
