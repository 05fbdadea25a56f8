"""evaluate.py with timm's conventions and train.py's W&B runs, on a fake ImageNet: presets by name, routings checked
before any pass, every results column, images/s under the trainer's precision, and offline W&B runs holding the
resolved config (checkpoint, routing rules) with the config file inside the run's own folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml
from timm.data import create_transform, resolve_model_data_config
from torchvision.datasets import ImageFolder

from attnprune import Routing, count_flops, load_model, save_model
from attnprune.cli.evaluate import COLUMNS, check_routings, throughput
from attnprune.cli.evaluate import main as evaluate_main
from attnprune.lit.modules import PrunedClassifier
from tests.conftest import tiny_backbone
from tests.fake_imagenet import make_fake_imagenet
from tests.wandb_run import read_run

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 5}
CFG = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic"}
ROUTING = {"name": "l2-drop", "rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5, "reduce": "drop"}]}


def test_every_routing_is_checked_against_the_model_first():
    backbone = PrunedClassifier(tiny_backbone()).backbone  # depth 4, 16 patch tokens
    routings = check_routings(["unpruned", "tome:r=2", "tome:r=2", "evit:keep=0.7"], backbone)
    assert list(routings) == ["unpruned", "tome-r2", "tome-r2-2", "evit-0.7"]
    with pytest.raises(ValueError, match=r"routing 'evit:keep=0.7,layers=9' does not fit the model: .*has 4 blocks"):
        check_routings(["unpruned", "evit:keep=0.7,layers=9"], backbone)


def test_throughput_runs_under_the_trainers_precision_with_warmup_and_rounds():
    module = PrunedClassifier(tiny_backbone())
    dtypes = []
    module.backbone.head.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    routings = {"unpruned": Routing(), "tome-r2": Routing.tome(2, 4)}
    batches = [torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    speed = throughput(module, routings, batches, trainer, warmup=1, repeats=2)
    assert set(speed) == set(routings) and all(value > 0 for value in speed.values())
    # (1 warm-up + 2 timed rounds) x 2 batches x 2 routings, every one under bf16 autocast
    assert dtypes == [torch.bfloat16] * 12


# ------------------------------------------------------------------------------------------- entry points
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fake ImageNet and a tiny DeiT-T-shaped model fitted to it for a few steps (so top-1 is not chance)."""
    root = tmp_path_factory.mktemp("evaluate")
    layouts = make_fake_imagenet(root / "imagenet")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained_cfg_overlay=CFG, **KWARGS)
    train = ImageFolder(
        str(layouts["folders"] / "train"), transform=create_transform(**resolve_model_data_config(model))
    )
    images, labels = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in train], strict=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    save_model(model.eval(), root / "model.safetensors", ARCH, model_kwargs=KWARGS)
    (root / "routing.yaml").write_text(yaml.safe_dump(ROUTING))
    return root


def config(workdir: Path, source: Path, **trainer) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "attnprune-test", "save_dir": str(workdir / "runs")},
            },
            **trainer,
        },
        "model": {
            "class_path": "attnprune.lit.modules.PrunedClassifier",
            "init_args": {"backbone": {"model": "auto", "checkpoint": str(workdir / "model.safetensors")}},
        },
        "data": {
            "class_path": "attnprune.lit.data.ImageNetDataModule",
            "init_args": {"source": str(source), "batch_size": 4, "cache_dir": str(workdir / "hf")},
        },
    }


def run(script: str, args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no key: W&B goes offline itself
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def new_run(workdir: Path, before: set[Path]) -> Path:
    (run_dir,) = set((workdir / "runs" / "wandb").glob("offline-run-*")) - before
    return run_dir


def runs(workdir: Path) -> set[Path]:
    return set((workdir / "runs" / "wandb").glob("offline-run-*"))


@torch.no_grad()
def imagefolder_top1(workdir: Path) -> float:
    """Top-1 (%) of the saved model on val/<wnid>/ read by torchvision's ImageFolder with timm's transform."""
    model = load_model(workdir / "model.safetensors")
    folder = ImageFolder(
        str(workdir / "imagenet" / "folders" / "val"), transform=create_transform(**resolve_model_data_config(model))
    )
    correct = sum(int(model(x[None]).argmax()) == y for x, y in folder)
    return 100.0 * correct / len(folder)


def test_evaluate_on_the_flat_validation_folder_writes_every_column(workdir):
    (workdir / "evaluate.yaml").write_text(yaml.safe_dump(config(workdir, workdir / "imagenet" / "flat" / "val")))
    before, out = runs(workdir), workdir / "results"
    args = ["--config", str(workdir / "evaluate.yaml"), "--output_dir", str(out)]
    timing = ["--throughput_repeats", "2", "--throughput_warmup", "1", "--throughput_batches", "2"]
    result = run("evaluate.py", [*args, "--routings", '[unpruned, "tome:r=12", "evit:keep=0.7"]', *timing], workdir)
    assert "15 images at 32 px (crop_pct 0.875, bicubic), batch 4, 32-true on cpu" in result.stdout

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS
    rows = json.loads((out / "results.json").read_text())
    assert [row["routing"] for row in rows] == ["unpruned", "tome-r12", "evit-0.7"]
    model = load_model(workdir / "model.safetensors")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    for row, csv_row in zip(rows, table, strict=True):
        assert set(COLUMNS) <= set(row) and all(csv_row[c] != "" for c in COLUMNS)
        assert row["model"] == ARCH and row["checkpoint"] == str(workdir / "model.safetensors")
        assert row["param_count"] == pytest.approx(params, abs=1e-4)
        assert (row["img_size"], row["crop_pct"], row["interpolation"]) == (32, 0.875, "bicubic")
        assert (row["images"], row["batch_size"], row["precision"]) == (15, 4, "32-true")
        assert row["device"].startswith("cpu (") and row["device"].endswith(" threads)")
        assert row["top1_err"] == pytest.approx(1 - row["top1"]) and row["top5_err"] == pytest.approx(1 - row["top5"])
        assert row["images_per_s"] > 0 and row["throughput_images"] == 8 and row["throughput_rounds"] == 2
    flops = [count_flops(model, Routing.parse(spec, 4)) / 1e9 for spec in ("unpruned", "tome:r=12", "evit:keep=0.7")]
    assert [row["gflops"] for row in rows] == pytest.approx(flops)
    # top-1 as a fraction, equal to torchvision's ImageFolder with timm's transform on the same images
    assert rows[0]["top1"] == pytest.approx(imagefolder_top1(workdir) / 100, abs=1e-6)
    assert rows[0]["top1"] > 0.2  # better than chance: the labels reach the model in the right order
    printed = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["unpruned"]}
    assert float(printed["unpruned"][2]) == pytest.approx(100 * rows[0]["top1"], abs=0.006)  # percent, on screen only
    assert (out / "top1_vs_gflops.png").is_file() and (out / "top1_vs_gflops.pdf").is_file()

    run_dir = new_run(workdir, before)
    logged = read_run(run_dir)
    for row in rows:  # one key per routing and metric, the fractions of the files
        assert {f"test/{row['routing']}/{m}" for m in ("top1", "top5", "gflops", "loss", "images_per_s")} <= logged.keys
        for metric in ("top1", "top5", "gflops", "images_per_s"):
            assert logged.history[f"test/{row['routing']}/{metric}"] == [pytest.approx(row[metric])]
    assert logged.summary["evaluate/results"]["_type"] == "table-file"
    assert logged.summary["evaluate/top1_vs_gflops_table"]["_type"] == "table-file"
    cfg = logged.config
    assert cfg["model"]["init_args"]["backbone"]["checkpoint"] == str(workdir / "model.safetensors")
    assert cfg["data"]["init_args"]["source"] == str(workdir / "imagenet" / "flat" / "val")
    assert cfg["trainer"]["accelerator"] == "cpu"
    assert [r["spec"] for r in cfg["routings"]] == ["unpruned", "tome:r=12", "evit:keep=0.7"]
    assert cfg["routings"][1]["rules"][0] == {"layer": 0, "r": 12, "reduce": "merge"}
    assert cfg["routings"][2]["rules"][0] == {"layer": 1, "score": "cls_attention", "keep": 0.7, "reduce": "fuse"}
    saved = yaml.safe_load((run_dir / "files" / "lightning_config.yaml").read_text())
    assert saved["routings"] == ["unpruned", "tome:r=12", "evit:keep=0.7"]


def test_a_routing_that_does_not_fit_fails_before_any_pass(workdir, monkeypatch):
    (workdir / "bad.yaml").write_text(yaml.safe_dump(config(workdir, workdir / "imagenet" / "flat" / "val")))
    before = runs(workdir)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--config", str(workdir / "bad.yaml"), "--output_dir", str(workdir / "bad")]
    with pytest.raises(ValueError, match=r"routing 'evit:keep=0.7,layers=9' does not fit the model: .*has 4 blocks"):
        evaluate_main([*args, "--routings", '[unpruned, "evit:keep=0.7,layers=9"]'])
    assert not (workdir / "bad").exists() and runs(workdir) == before  # no pass ran, no W&B run was made


def test_train_run_config_holds_checkpoint_routing_and_a_config_file_of_its_own(workdir):
    cfg = config(
        workdir,
        workdir / "imagenet" / "folders",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=1,
    )
    cfg["model"]["init_args"]["backbone"]["routing"] = str(workdir / "routing.yaml")
    cfg["model"]["init_args"].update(lr=1e-3, weight_decay=0.01)
    cfg["checkpoint"] = {"dirpath": str(workdir / "ckpt")}
    (workdir / "train.yaml").write_text(yaml.safe_dump(cfg))
    before = runs(workdir)
    run("train.py", ["fit", "--config", str(workdir / "train.yaml")], workdir)
    run_dir = new_run(workdir, before)
    logged = read_run(run_dir)
    config_of_run = logged.config
    init_args = config_of_run["model"]["init_args"]
    assert init_args["backbone"]["checkpoint"] == str(workdir / "model.safetensors")
    assert (init_args["lr"], init_args["weight_decay"]) == (1e-3, 0.01)
    routing = {"spec": str(workdir / "routing.yaml"), "prop_attn": True, "seed": 0, **ROUTING}
    assert init_args["backbone"]["routing"] == routing
    assert config_of_run["trainer"]["max_epochs"] == 1 and config_of_run["checkpoint"]["dirpath"]
    assert config_of_run["data"]["init_args"]["batch_size"] == 4
    assert "lr" not in config_of_run  # Lightning's flat module hyper-parameters do not overwrite the config
    optimizer = config_of_run["optimizer"]  # what trained: the module's AdamW and schedule, not null
    assert (optimizer["class_path"], optimizer["init_args"]["lr"], optimizer["init_args"]["weight_decay"]) == (
        "torch.optim.AdamW",
        1e-3,
        0.01,
    )
    assert config_of_run["lr_scheduler"]["class_path"] == "attnprune.lit.optim.WarmupCosine"
    assert {"train/loss", "val/top1"} <= logged.keys
    saved = yaml.safe_load((run_dir / "files" / "lightning_config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"]["routing"] == str(workdir / "routing.yaml")
    # every run (evaluate's above too) keeps its own file; none is written where the next run would overwrite it
    assert all((run / "files" / "lightning_config.yaml").is_file() for run in runs(workdir))
    assert not (workdir / "runs" / "config.yaml").exists()
