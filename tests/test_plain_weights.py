"""A plain timm state dict (``torch.save(model.state_dict())``), which names no architecture, is given one on the
command line: ``--architecture`` for search.py and analyze.py, ``teacher_architecture`` for a distillation teacher;
without it, the error says which option to give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from attnprune import Routing, count_flops
from attnprune.cli.analyze import main as analyze_main
from attnprune.cli.search import main as search_main
from attnprune.lit.modules import DistillationClassifier
from tests.fake_imagenet import make_fake_imagenet

ARCH = "test_vit"  # timm's test ViT: 160 px, width 64, depth 6, ImageNet's 1,000 classes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    make_fake_imagenet(root / "imagenet")
    torch.manual_seed(0)
    torch.save(timm.create_model(ARCH).state_dict(), root / "model.pth")
    return root


def data_args(workdir: Path) -> list[str]:
    args = ["--data.class_path", "attnprune.lit.data.ImageNetDataModule"]
    args += ["--data.init_args.source", str(workdir / "imagenet" / "val_only"), "--data.init_args.batch_size", "4"]
    return args + ["--data.init_args.cache_dir", str(workdir / "hf"), "--data.init_args.search_split", "6"]


def test_search_and_analyze_take_the_architecture_of_a_plain_state_dict(workdir):
    weights, out = str(workdir / "model.pth"), workdir / "routing.yaml"
    with pytest.raises(ValueError, match=r"model.pth carries no architecture.*--architecture deit_small_patch16_224"):
        search_main(["--model", weights, *data_args(workdir), "--budget", "0.8", "--output", str(out)])
    search = ["--budget", "0.8", "--val_images", "6", "--output", str(out), "--holdout", "0"]
    search_main(["--model", weights, "--architecture", ARCH, *data_args(workdir), *search])
    model = timm.create_model(ARCH)
    assert count_flops(model, Routing.from_yaml(out)) <= 0.8 * count_flops(model)
    report = workdir / "analysis"
    analysis = ["--num_images", "4", "--oracle", "false", "--output_dir", str(report)]
    analyze_main(["--model", weights, "--architecture", ARCH, *data_args(workdir), *analysis])
    assert len(json.loads((report / "selectivity.json").read_text())["metrics"]["cls_gini"]) == 6  # its 6 blocks


def test_a_distillation_teacher_takes_its_architecture(workdir):
    student = {"model": "deit_tiny_distilled_patch16_224", "model_kwargs": {"img_size": 32, "depth": 2}}
    module = DistillationClassifier(str(workdir / "model.pth"), backbone=student, teacher_architecture=ARCH)
    saved = torch.load(workdir / "model.pth")
    assert all(torch.equal(module.teacher.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match=r"carries no architecture.*teacher_architecture"):
        DistillationClassifier(str(workdir / "model.pth"), backbone=student)
