"""SelectivityCallback's default costs about a validation epoch: no oracle, the first ``max_images`` images, every
``every_n_epochs`` epochs; it measures the same numbers as the analyzer run by hand on those images."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from attnprune.lit.callbacks import SelectivityCallback
from attnprune.lit.data import ImageFolderDataModule
from attnprune.lit.modules import PrunedClassifier
from attnprune.selectivity import SelectivityAnalyzer
from tests.conftest import make_image_folder, tiny_backbone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, "enable_checkpointing": False, **kwargs})


def test_default_is_cheap_and_analyses_the_first_max_images(folder, tmp_path):
    default = SelectivityCallback()
    assert (default.oracle, default.max_images, default.max_fraction, default.every_n_epochs) == (False, 64, 0.15, 1)
    torch.manual_seed(0)
    module = PrunedClassifier(tiny_backbone())
    data = ImageFolderDataModule(root=str(folder), batch_size=4, val_size=6, cache_dir=str(tmp_path / "hf"))
    callback = SelectivityCallback(max_images=5, max_fraction=None)
    metrics = trainer(callbacks=[callback]).validate(module, data, verbose=False)[0]
    assert callback.seen == 5 and metrics["selectivity/images"] == 5.0  # 4 of the first batch, 1 of the second
    assert not any("reliability" in key for key in metrics)  # no oracle unless asked
    assert {"selectivity/cls_gini/layer_3", "selectivity/noise_stability/layer_0"} <= set(metrics)

    loader = iter(data.val_dataloader())
    first = torch.cat([next(loader)[0], next(loader)[0][:1]])
    analyzer = SelectivityAnalyzer(4, True, oracle=False)
    analyzer.update(module.backbone, first)
    by_hand = analyzer.compute()
    for metric in ("cls_gini", "all_normalized_entropy", "head_agreement"):
        for layer in range(4):
            assert metrics[f"selectivity/{metric}/layer_{layer}"] == pytest.approx(by_hand[metric][layer], abs=1e-5)


def test_oracle_only_when_asked_and_every_n_epochs(folder, tmp_path):
    module = PrunedClassifier(tiny_backbone())
    data = ImageFolderDataModule(root=str(folder), batch_size=4, val_size=6, cache_dir=str(tmp_path / "hf"))
    callback = SelectivityCallback(max_images=2, oracle=True, scorers=["l2_norm", "cls_attention"], every_n_epochs=2)
    logger = CSVLogger(str(tmp_path), name="csv")
    fit = trainer(callbacks=[callback], logger=logger, max_epochs=3, limit_train_batches=1, log_every_n_steps=1)
    fit.fit(module, data)
    with open(logger.experiment.metrics_file_path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("selectivity/images")]
    assert [int(row["epoch"]) for row in rows] == [0, 2]  # epochs 0 and 2 of 0-2
    assert all(float(row["selectivity/images"]) == 2.0 for row in rows)
    assert rows[0]["selectivity/reliability_spearman_l2_norm/layer_1"] != ""
    assert "selectivity/reliability_spearman_std/layer_1" not in rows[0]  # only the scorers asked for


def test_default_analyses_at_most_a_fraction_of_the_epoch(folder, tmp_path):
    module = PrunedClassifier(tiny_backbone())
    data = ImageFolderDataModule(root=str(folder), batch_size=4, val_size=6, cache_dir=str(tmp_path / "hf"))
    callback = SelectivityCallback()  # 2 validation batches of 4: about 8 images, 15% of them is 2
    metrics = trainer(callbacks=[callback]).validate(module, data, verbose=False)[0]
    assert callback.seen == 2 and metrics["selectivity/images"] == 2.0


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"max_images and every_n_epochs must be >= 1, got 0 and 1"):
        SelectivityCallback(max_images=0)
    with pytest.raises(ValueError, match=r"max_fraction must be in \(0, 1\], got 1.5"):
        SelectivityCallback(max_fraction=1.5)


def test_config_snippet_adds_the_callback_to_a_training_config(capsys):
    from attnprune.lit.cli import AttnpruneCLI

    args = ["fit", "--config", f"{ROOT}/configs/fashion_mnist/supervised.yaml"]
    with pytest.raises(SystemExit):
        AttnpruneCLI(args=[*args, "--config", f"{ROOT}/configs/callbacks/selectivity.yaml", "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert callbacks == [
        {
            "class_path": "attnprune.lit.callbacks.SelectivityCallback",
            "init_args": {
                "max_images": 64,
                "max_fraction": 0.15,
                "oracle": False,
                "scorers": None,
                "keep": 0.5,
                "every_n_epochs": 1,
                "max_batches": None,
            },
        }
    ]
