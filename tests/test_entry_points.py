"""train.py and evaluate.py run end to end as a user runs them: subprocesses, YAML configs, W&B offline."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from attnprune import Routing, count_flops
from attnprune.lit.data import ImageFolderDataModule
from attnprune.lit.modules import PrunedClassifier
from tests.conftest import TINY_BACKBONE, make_image_folder, tiny_backbone
from tests.wandb_run import read_run

ROOT = Path(__file__).resolve().parents[1]
ROUTING = {
    "name": "l2-then-merge",
    "rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5}, {"layer": 2, "r": 2, "reduce": "merge"}],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    make_image_folder(root / "data", train_per_class=8, test_per_class=5)  # 15 test images: odd, for DDP
    (root / "routing.yaml").write_text(yaml.safe_dump(ROUTING))
    return root


def config(workdir: Path, **trainer: object) -> dict:
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
            "init_args": {"backbone": dict(TINY_BACKBONE)},
        },
        "data": {
            "class_path": "attnprune.lit.data.ImageFolderDataModule",
            "init_args": {
                "root": str(workdir / "data"),
                "batch_size": 4,
                "val_size": 6,
                "cache_dir": str(workdir / "hf-cache"),
            },
        },
    }


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # No W&B variables at all: no key, so the logger must go offline by itself, and no handle on a wandb service
    # that an in-process test of this session started.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_dirs(workdir: Path) -> list[Path]:
    return sorted((workdir / "runs" / "wandb").glob("offline-run-*"))


def also_csv(cfg: dict, save_dir: Path) -> dict:
    """``cfg`` logging to a CSV logger under ``save_dir`` beside W&B."""
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir)}}
    cfg["trainer"]["logger"] = [cfg["trainer"]["logger"], csv_logger]
    return cfg


def csv_history(save_dir: Path, prefixes: tuple[str, ...]) -> dict[str, list[float]]:
    """Every value of each key starting with one of ``prefixes`` in the CSV logger's ``metrics.csv``, in order."""
    (path,) = save_dir.glob("**/metrics.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [key for key in rows[0] if key.startswith(prefixes)]
    return {key: [float(row[key]) for row in rows if row[key] != ""] for key in keys}


def same_in_every_logger(wandb_history: dict[str, list], csv_logged: dict[str, list], prefixes: tuple[str, ...]):
    """The W&B run and the CSV logger hold the same keys under ``prefixes``, each with the same values."""
    logged = {key: values for key, values in wandb_history.items() if key.startswith(prefixes)}
    assert set(logged) == set(csv_logged)
    for key, values in logged.items():
        assert csv_logged[key] == pytest.approx(values, rel=1e-6), key


def test_train_from_yaml_writes_checkpoint_and_wandb_run(workdir):
    cfg = config(workdir, max_epochs=2, limit_train_batches=2, limit_val_batches=2, log_every_n_steps=1)
    cfg["model"]["init_args"]["backbone"]["routing"] = str(workdir / "routing.yaml")
    cfg["checkpoint"] = {"dirpath": str(workdir / "ckpt"), "monitor": "val/top1", "mode": "max", "save_top_k": -1}
    (workdir / "train.yaml").write_text(yaml.safe_dump(also_csv(cfg, workdir / "csv-train")))
    before = set(run_dirs(workdir))
    run("train.py", ["fit", "--config", str(workdir / "train.yaml")], workdir)
    assert (workdir / "ckpt" / "last.ckpt").is_file()
    (new_run,) = set(run_dirs(workdir)) - before
    logged = read_run(new_run)
    assert {"train/loss", "val/top1", "val/loss", "val/gflops", "trainer/global_step"} <= logged.keys
    assert any(key.startswith("lr-") for key in logged.keys)
    # the values: 2 epochs of 2 steps, one validation per epoch, each redone by hand from that epoch's checkpoint
    history = logged.history
    assert len(history["train/loss"]) == 4 and len(history["val/top1"]) == len(history["val/loss"]) == 2
    for epoch, step in ((0, 2), (1, 4)):
        module = PrunedClassifier.load_from_checkpoint(workdir / "ckpt" / f"epoch={epoch}-step={step}.ckpt").eval()
        data = ImageFolderDataModule(
            root=str(workdir / "data"), val_size=6, cache_dir=str(workdir / "hf-cache"), data_config=module.data_config
        )
        data.setup()
        with torch.no_grad():
            batches = [(module(images), labels) for images, labels in data.val_dataloader()]
        logits, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        assert len(labels) == 6
        top1 = (logits.argmax(-1) == labels).float().mean().item()
        assert history["val/top1"][epoch] == pytest.approx(top1, abs=1e-6)
        assert history["val/loss"][epoch] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    gflops = count_flops(module.model, Routing.from_dict(ROUTING)) / 1e9
    assert history["val/gflops"] == [pytest.approx(gflops)] * 2
    prefixes = ("train/", "val/", "lr-")  # the CSV logger got the same keys and values (top-1 a fraction in both)
    same_in_every_logger(history, csv_history(workdir / "csv-train", prefixes), prefixes)


def test_evaluate_prints_table_and_writes_files(workdir):
    (workdir / "evaluate.yaml").write_text(yaml.safe_dump(also_csv(config(workdir), workdir / "csv-evaluate")))
    before = set(run_dirs(workdir))
    out = workdir / "results"
    result = run(
        "evaluate.py",
        [
            "--config",
            str(workdir / "evaluate.yaml"),
            "--routings",
            f"[unpruned, {workdir / 'routing.yaml'}]",
            "--output_dir",
            str(out),
            "--throughput_repeats",
            "2",
        ],
        workdir,
    )
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("routing"))
    assert lines[header].split() == ["routing", "GFLOPs", "top-1", "%", "top-5", "%", "images/s"]
    assert lines[header + 1].split()[0] == "unpruned" and lines[header + 2].split()[0] == "l2-then-merge"
    rows = json.loads((out / "results.json").read_text())
    assert [row["routing"] for row in rows] == ["unpruned", "l2-then-merge"]
    assert rows[1]["gflops"] < rows[0]["gflops"] and all(0 <= row["top1"] <= 1 for row in rows)  # fractions
    for row, line in zip(rows, lines[header + 1 : header + 3], strict=True):  # printed in percent
        assert float(line.split()[2]) == pytest.approx(100 * row["top1"], abs=0.006)
    assert all(row["images_per_s"] > 0 for row in rows)
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["model", "checkpoint", "routing"] and header[-6:-4] == ["gflops", "top1"]
    # one key per routing and metric, the same in W&B and the CSV logger, with the values of results.json
    (new_run,) = set(run_dirs(workdir)) - before
    logged, csv_logged = read_run(new_run).history, csv_history(workdir / "csv-evaluate", ("test/",))
    same_in_every_logger(logged, csv_logged, ("test/",))
    metrics = ("top1", "loss", "gflops", "images_per_s")  # 3 classes: no top-5
    assert set(csv_logged) == {f"test/{row['routing']}/{metric}" for row in rows for metric in metrics}
    for row in rows:
        for metric in ("top1", "gflops", "images_per_s"):
            assert csv_logged[f"test/{row['routing']}/{metric}"] == [pytest.approx(row[metric], rel=1e-6)]


def test_evaluate_with_two_ddp_processes_matches_one(workdir):
    cfg = config(workdir)
    cfg["trainer"]["logger"] = False
    (workdir / "single.yaml").write_text(yaml.safe_dump(cfg))
    cfg["trainer"].update(strategy="ddp", devices=2)
    (workdir / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    top1 = {}
    for name in ("single", "ddp"):
        out = workdir / f"results-{name}"
        run(
            "evaluate.py",
            [
                "--config",
                str(workdir / f"{name}.yaml"),
                "--routings",
                f"[{workdir / 'routing.yaml'}]",
                "--output_dir",
                str(out),
                "--throughput_repeats",
                "0",
            ],
            workdir,
        )
        top1[name] = json.loads((out / "results.json").read_text())[0]["top1"]
    assert top1["ddp"] == pytest.approx(top1["single"], abs=1e-6)


def test_search_command_writes_a_routing_within_budget(workdir):
    from attnprune import Routing, count_flops, load_model, save_model
    from attnprune.lit.modules import PrunedClassifier

    model = PrunedClassifier(tiny_backbone()).model
    weights = save_model(
        model, workdir / "tiny.safetensors", "vit_tiny_patch16_224", model_kwargs=TINY_BACKBONE["model_kwargs"]
    )
    out = workdir / "search" / "routing.yaml"
    run(
        "search.py",
        [
            "--model",
            str(weights),
            "--data.class_path",
            "attnprune.lit.data.ImageFolderDataModule",
            "--data.init_args.root",
            str(workdir / "data"),
            "--data.init_args.val_size",
            "6",
            "--data.init_args.cache_dir",
            str(workdir / "hf-cache"),
            "--budget",
            "0.7",
            "--val_images",
            "6",
            "--output",
            str(out),
        ],
        workdir,
    )
    routing = Routing.from_yaml(out)
    report = json.loads(out.with_suffix(".json").read_text())
    loaded = load_model(weights)
    assert count_flops(loaded, routing) <= 0.7 * count_flops(loaded) and report["objective"] == "kl"
    assert report["images"] == 4 and report["check"]["holdout_images"] == 2  # 30% held out by default
