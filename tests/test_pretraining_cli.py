"""DINO and MAE pretraining run through train.py from YAML (subprocesses) and leave a backbone file that
``attnprune.load_model`` rebuilds alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from attnprune import load_model
from tests.test_entry_points import config, run, workdir  # noqa: F401  (workdir: the tiny image-folder fixture)

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
PRETRAINED_CFG = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0}
MODULES = {
    "dino": (
        "attnprune.lit.pretraining.DINOPretraining",
        {"out_dim": 64, "head_hidden": 32, "head_bottleneck": 16},
        {
            "class_path": "attnprune.pretrain.MultiCropTransform",
            "init_args": {"global_size": 16, "local_size": 8, "num_local": 2, "mean": [0.5], "std": [0.5]},
        },
    ),
    "mae": (
        "attnprune.lit.pretraining.MAEPretraining",
        {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        None,
    ),
}


@pytest.mark.parametrize("paradigm", sorted(MODULES))
def test_pretraining_from_yaml_writes_a_loadable_backbone(workdir: Path, paradigm: str) -> None:  # noqa: F811
    class_path, init_args, train_transform = MODULES[paradigm]
    backbone = workdir / f"{paradigm}-out" / "backbone.safetensors"
    cfg = config(workdir, max_epochs=1, limit_train_batches=2)  # W&B offline: train.py always monitors the LR
    cfg["model"] = {
        "class_path": class_path,
        "init_args": {
            "model": "vit_tiny_patch16_224",
            "model_kwargs": TINY_VIT,
            "pretrained_cfg": PRETRAINED_CFG,
            "warmup_epochs": 0,
            "backbone_path": str(backbone),
            **init_args,
        },
    }
    if train_transform is not None:
        cfg["data"]["init_args"]["train_transform"] = train_transform
    cfg["checkpoint"] = {"dirpath": str(workdir / f"{paradigm}-ckpt")}
    path = workdir / f"{paradigm}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run("train.py", ["fit", "--config", str(path)], workdir)

    assert (workdir / f"{paradigm}-ckpt" / "last.ckpt").is_file()
    model = load_model(backbone)
    assert model.attnprune_spec["paradigm"] == paradigm and model.num_classes == 0
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 16, 16)
    assert model.global_pool == ("avg" if paradigm == "mae" else "token")
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 32)
