"""The val-only ImageNet workflow: a seeded search split and a report split carved out of ImageNet's validation
images, disjoint; search.py and analyze.py read the first, evaluate.py reports on the second and refuses a routing
whose search saw any of its images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import yaml

from attnprune import Routing, save_model
from attnprune.cli.analyze import main as analyze_main
from attnprune.cli.evaluate import main as evaluate_main
from attnprune.cli.search import main as search_main
from attnprune.lit.data import ImageNetDataModule
from attnprune.lit.data.splits import disjoint_draws
from tests.fake_imagenet import SUBSET, make_fake_imagenet

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 1000}
FOLDERS = {"kaggle_cls_loc": "kaggle/ILSVRC/Data/CLS-LOC"}  # make_fake_imagenet's layouts not named by their folder
CFG = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fake ImageNet (5 real wnids, 15 validation images) and a tiny random model of ImageNet's 1,000 classes."""
    root = tmp_path_factory.mktemp("val-only")
    make_fake_imagenet(root / "imagenet")
    model = timm.create_model(ARCH, pretrained_cfg_overlay=CFG, **KWARGS).eval()
    save_model(model, root / "model.safetensors", ARCH, model_kwargs=KWARGS)
    return root


def data(workdir: Path, layout: str = "val_only", **kwargs) -> ImageNetDataModule:
    source = str(workdir / "imagenet" / FOLDERS.get(layout, layout))
    return ImageNetDataModule(source=source, batch_size=4, cache_dir=str(workdir / "hf"), **kwargs)


def file_names(split: datasets.Dataset) -> list[str]:
    return [Path(item["path"]).name for item in split.cast_column("image", datasets.Image(decode=False))["image"]]


def test_search_split_is_a_seeded_disjoint_carve_out_of_the_validation_images(workdir):
    dm = data(workdir, search_split=6, seed=0)
    dm.prepare_splits()
    assert {name: len(split) for name, split in dm.splits.items()} == {"validation": 6, "test": 9}
    order = np.random.default_rng(0).permutation(15).tolist()  # the documented carve-out: this permutation's first 6
    assert dm.origins["validation"] == ("validation", order[:6]) and dm.origins["test"] == ("validation", order[6:])
    searched, reported = file_names(dm.splits["validation"]), file_names(dm.splits["test"])
    assert not set(searched) & set(reported) and len(set(searched) | set(reported)) == 15  # disjoint, all of val
    whole = data(workdir)
    whole.prepare_splits()
    assert searched == [file_names(whole.splits["test"])[i] for i in order[:6]]
    again = data(workdir, search_split=0.4, seed=0)  # a fraction: ceil(0.4 * 15) = 6, the same images
    again.prepare_splits()
    assert file_names(again.splits["validation"]) == searched
    other = data(workdir, search_split=6, seed=1)
    other.prepare_splits()
    assert file_names(other.splits["validation"]) != searched
    assert dm.describe_split("validation") == (
        f"the validation split (6 images of the validation split of ImageNet source {workdir}/imagenet/val_only, by "
        "search_split 6 with seed 0; none of them in the test split)"
    )


def test_search_split_errors_and_what_each_stage_needs(workdir):
    with pytest.raises(ValueError, match=r"search_split=15 holds out 15 of the 15 images of the validation split of"):
        data(workdir, search_split=15).prepare_splits()
    with pytest.raises(ValueError, match=r"search_split as a fraction must be in \(0, 1\), got 1.5"):
        data(workdir, search_split=1.5).prepare_splits()
    without = data(workdir)
    with pytest.raises(ValueError, match=r"no training split to carve the validation split out of.*give search_split"):
        without.setup("validate")
    with pytest.raises(ValueError, match=r"no training split to carve the validation split out of"):
        without.take("validation", 4)
    dm = data(workdir, search_split=6, data_config=CFG)
    dm.setup("validate")  # no training split needed
    assert sum(len(labels) for _, labels in dm.val_dataloader()) == 6
    with pytest.raises(ValueError, match=r"has no training split, which `fit` needs"):
        dm.setup("fit")


def evaluate_config(workdir: Path, source: Path, **data_args) -> Path:
    path = workdir / f"evaluate-{len(list(workdir.glob('evaluate-*.yaml')))}.yaml"
    config = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(workdir / "runs"),
        },
        "model": {
            "class_path": "attnprune.lit.modules.PrunedClassifier",
            "init_args": {"backbone": {"model": "auto", "checkpoint": str(workdir / "model.safetensors")}},
        },
        "data": {
            "class_path": "attnprune.lit.data.ImageNetDataModule",
            "init_args": {"source": str(source), "batch_size": 4, "cache_dir": str(workdir / "hf"), **data_args},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("layout", "images"), [("val_only", 15), ("subset", 6), ("kaggle_cls_loc", 15)])
def test_search_analyze_and_evaluate_on_val_only_imagenet(workdir, layout, images, capsys):
    """A val-only class-folder tree, a 2-class subset of other wnids, whose labels must stay ImageNet's (7, 42), and
    Kaggle's tree given at ILSVRC/Data/CLS-LOC (its training images kept whole, the search split carved from val)."""
    source = workdir / "imagenet" / FOLDERS.get(layout, layout)
    searched = math.ceil(0.4 * images)
    split = ["--data.class_path", "attnprune.lit.data.ImageNetDataModule", "--data.init_args.source", str(source)]
    split += ["--data.init_args.cache_dir", str(workdir / "hf"), "--data.init_args.batch_size", "4"]
    split += ["--data.init_args.search_split", "0.4"]
    out = workdir / layout / "routing.yaml"
    model = str(workdir / "model.safetensors")
    search_main(["--model", model, *split, "--budget", "0.8", "--output", str(out)])  # the split's images
    assert f"searching on the first {searched} images of the validation split ({searched} images of the validation" in (
        capsys.readouterr().out
    )
    report = json.loads(out.with_suffix(".json").read_text())
    order = np.random.default_rng(0).permutation(images).tolist()
    assert report["searched_on"] == {
        "source": f"ImageNet source {source}",
        "split": "validation",
        "seed": 0,
        "val_size": None,
        "search_split": 0.4,
        "positions": order[:searched],
    }
    assert report["images"] + report["check"]["holdout_images"] == searched
    Routing.from_yaml(out)

    analysed = min(5, searched)
    analysis = ["--num_images", str(analysed), "--oracle", "false", "--output_dir", str(workdir / layout / "analysis")]
    analyze_main(["--model", model, *split, *analysis])
    assert (
        f"analysing the first {analysed} images of the validation split ({searched} images" in capsys.readouterr().out
    )
    assert json.loads((workdir / layout / "analysis" / "selectivity.json").read_text())["meta"]["images"] == analysed

    results = workdir / layout / "results"
    rows = evaluate_main(
        ["--config", str(evaluate_config(workdir, source, search_split=0.4)), "--routings", f"[unpruned, {out}]"]
        + ["--output_dir", str(results), "--throughput_repeats", "0"]
    )
    assert [row["images"] for row in rows] == [images - searched] * 2  # the report split only
    assert f"evaluating on the test split ({images - searched} images of the validation split" in (
        capsys.readouterr().out
    )
    dm = data(workdir, layout, search_split=0.4)
    dm.prepare_splits()
    assert set(dm.splits["validation"]["label"]) | set(dm.splits["test"]["label"]) == (
        set(SUBSET.values()) if layout == "subset" else set(range(5))
    )

    # the whole validation split, or another seed's report split, holds images the search saw: refused, with the count
    for data_args, seen, total in (({}, searched, images), ({"search_split": 0.4, "seed": 1}, None, images - searched)):
        other = data(workdir, layout, **data_args)
        other.prepare_splits()
        seen = len(set(order[:searched]) & set(other.origins["test"][1])) if seen is None else seen
        assert seen > 0
        with pytest.raises(ValueError, match=rf"routing {out} was searched on {seen} of the {total} test images"):
            evaluate_main(["--config", str(evaluate_config(workdir, source, **data_args)), "--routings", f"[{out}]"])


def test_disjoint_draws_cut_one_fixed_permutation_into_batches():
    images, labels = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    cut = disjoint_draws(batches, 3, [0, 2], 2, permutation_seed=5)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    assert [len(y) for _, y in cut[0]] == [2, 1] and [len(y) for _, y in cut[2]] == [2, 1]
    assert torch.cat([y for _, y in cut[0]]).tolist() == order[:3].tolist()
    assert torch.cat([y for _, y in cut[2]]).tolist() == order[6:9].tolist()  # draw 2: the third block of three
    assert all((x.flatten() == y.float()).all() for _, batch in cut.items() for x, y in batch)  # images keep labels
    with pytest.raises(ValueError, match="^4 draws of 3 images exceed the 10 images there are$"):
        disjoint_draws(batches, 3, [3], 2)
