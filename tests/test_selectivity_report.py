"""The selectivity callback in a real validation run, the analyze command, token maps and the notebook."""

from __future__ import annotations

import json
import os

import lightning as L
import nbformat
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from nbclient import NotebookClient

from attnprune import Routing, save_model
from attnprune.cli.analyze import analyze
from attnprune.lit.callbacks import SelectivityCallback
from attnprune.lit.data import ImageFolderDataModule
from attnprune.lit.modules import PrunedClassifier
from attnprune.report import membership_map
from tests.conftest import TINY_BACKBONE, make_image_folder, tiny_backbone
from tests.wandb_run import read_run

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "selectivity.ipynb")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def test_callback_logs_per_layer_keys_to_wandb(folder, tmp_path):
    module = PrunedClassifier(tiny_backbone(routing={"rules": [{"layer": 1, "r": 4, "reduce": "merge"}]}))
    data = ImageFolderDataModule(root=str(folder), batch_size=6, val_size=6, cache_dir=str(tmp_path / "hf"))
    logger = WandbLogger(project="attnprune-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[SelectivityCallback(max_batches=1, oracle=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.validate(module, data, verbose=False)[0]
    wandb.finish()
    wandb.teardown()  # waits for wandb's service to close the run file
    assert 0.0 <= metrics["selectivity/cls_normalized_entropy/layer_0"] <= 1.0
    assert "selectivity/layer_stability/layer_0" not in metrics  # undefined at the first layer: not logged
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = read_run(run_dir)
    assert logged.history["selectivity/cls_normalized_entropy/layer_0"] == [
        pytest.approx(metrics["selectivity/cls_normalized_entropy/layer_0"])
    ]
    assert {
        "selectivity/cls_gini/layer_3",
        "selectivity/reliability_spearman_l2_norm/layer_2",
        "selectivity/head_agreement/layer_1",
    } <= logged.keys
    assert "selectivity/layer_stability/layer_0" not in logged.keys
    assert logged.summary["selectivity/table"]["_type"] == "table-file"


@pytest.fixture(scope="module")
def analysis(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    model = PrunedClassifier(tiny_backbone()).model
    path = save_model(
        model, out / "tiny.safetensors", "vit_tiny_patch16_224", model_kwargs=TINY_BACKBONE["model_kwargs"]
    )
    routing = out / "routing.yaml"
    Routing.from_dict(
        {
            "name": "mixed",
            "rules": [
                {"layer": 1, "score": "l2_norm", "keep": 0.75},
                {"layer": 2, "r": 3, "reduce": "merge"},
                {"layer": 3, "score": "cls_attention", "keep": 0.5, "reduce": "fuse"},
            ],
        }
    ).to_yaml(routing)
    data = ImageFolderDataModule(root=str(folder), batch_size=4, val_size=6, cache_dir=str(out / "hf"))
    routings = [str(routing), "tome:r=2"]  # a YAML file and a preset spec, read as evaluate.py reads them
    meta = analyze(str(path), data, output_dir=str(out / "report"), num_images=5, routings=routings, token_map_images=2)
    return out / "report", meta


def test_analyze_writes_tables_and_plots(analysis):
    report, meta = analysis
    assert {p.name for p in report.iterdir()} == {
        "selectivity.json",
        "selectivity.csv",
        "selectivity.png",
        "selectivity.pdf",
        "reliability.png",
        "reliability.pdf",
        "tokens_mixed.png",
        "tokens_mixed.pdf",
        "tokens_tome-r2.png",
        "tokens_tome-r2.pdf",
    }
    saved = json.loads((report / "selectivity.json").read_text())
    assert saved["meta"]["images"] == 5 and saved["meta"]["oracle_sequences"] == 5 * 4 * 16
    assert len(saved["metrics"]["reliability_spearman_redundancy"]) == 4
    rows = (report / "selectivity.csv").read_text().splitlines()
    assert rows[0] == "metric,layer,value" and len(rows) == 1 + 4 * len(saved["metrics"])


def test_membership_map_by_hand():
    # 4 patches (2 x 2 grid) + CLS; token 1 stands for patches 0 and 3, token 2 for patch 1; patch 2 was dropped
    source = torch.zeros(1, 3, 5)
    source[0, 0, 0] = 1
    source[0, 1, [1, 4]] = 0.5
    source[0, 2, 2] = 1
    assert membership_map(source, 1, (2, 2)).tolist() == [[[1, 2], [-1, 1]]]


def test_notebook_runs_headless_on_the_analysis(analysis):
    report, _ = analysis
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["SELECTIVITY_DIR"] = str(report)
    try:
        NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    finally:
        del os.environ["SELECTIVITY_DIR"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert any("attention beats every other scorer" in o.get("text", "") for o in outputs)
