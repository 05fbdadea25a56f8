"""ImageNetDataModule reads ImageNet in every layout users have it, and evaluates like torchvision's ImageFolder with
timm's transform: the same labels (sorted wnids), the same tensors, the same top-1."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import datasets
import pytest
import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from torchvision.datasets import ImageFolder

from attnprune.lit.data import ImageFolderDataModule, ImageNetDataModule, read_devkit_labels
from tests.conftest import make_image_folder
from tests.fake_imagenet import HUB_ID, SUBSET, WNIDS, make_fake_imagenet, val_id

LAYOUTS = (
    "folders",
    "val_only",
    "flat",
    "flat_beside",
    "kaggle",
    "kaggle_cls_loc",
    "kaggle_val",
    "devkit",
    "devkit_val",
    "disk",
    "parquet",
    "hub_cache",
)
WITH_TRAIN = {"folders", "flat", "kaggle", "kaggle_cls_loc", "disk", "parquet", "hub_cache"}


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> dict[str, Path]:
    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
        pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic"},
    ).eval()


def datamodule(fake: dict[str, Path], layout: str, tmp_path: Path, **kwargs) -> ImageNetDataModule:
    if layout == "hub_cache":
        kwargs.update(source=HUB_ID, hub_cache_dir=str(fake["hub_cache"]))
    else:
        kwargs.update(source=str(fake[layout]))
    return ImageNetDataModule(batch_size=4, cache_dir=str(tmp_path / "hf"), **kwargs)


@torch.no_grad()
def predictions(model, batches) -> tuple[list[tuple[int, float, int]], float]:
    """(label, image checksum, predicted class) per image, sorted, and top-1 in percent."""
    rows = []
    for images, labels in batches:
        predicted = model(images).argmax(dim=1)
        rows += [
            (int(y), round(float(x.double().sum()), 3), int(p))
            for x, y, p in zip(images, labels, predicted, strict=True)
        ]
    return sorted(rows), 100.0 * sum(row[0] == row[2] for row in rows) / len(rows)


@pytest.fixture(scope="module")
def reference(fake, model) -> tuple[list, float]:
    """torchvision's ImageFolder on val/<wnid>/ with timm's eval transform of the model."""
    folder = ImageFolder(str(fake["reference"]), transform=create_transform(**resolve_model_data_config(model)))
    assert folder.classes == WNIDS
    loader = torch.utils.data.DataLoader(folder, batch_size=4)
    return predictions(model, loader)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_imagefolder_with_timms_transform(fake, model, reference, layout, tmp_path):
    dm = datamodule(fake, layout, tmp_path).for_model(model)
    dm.setup("test")
    # class folders and the flat folder are indexed in ImageNet-1k's 1,000 classes; the datasets keep their 5 names
    assert dm.num_classes == (5 if layout in {"disk", "parquet", "hub_cache"} else 1000)
    expected_splits = {"train": 18, "validation": 2, "test": 15} if layout in WITH_TRAIN else {"test": 15}
    assert {split: len(data) for split, data in dm.splits.items()} == expected_splits
    assert Counter(dm.splits["test"]["label"]) == {label: 3 for label in range(5)}
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    rows, top1 = predictions(model, dm.test_dataloader())
    assert rows == reference[0]  # same labels, same tensors, same predictions
    assert top1 == reference[1]


def test_flat_folder_labels_come_from_the_solution_file(fake, tmp_path):
    dm = datamodule(fake, "flat_beside", tmp_path)
    dm.prepare_splits()
    test = dm.splits["test"]
    paths = test.cast_column("image", datasets.Image(decode=False))["image"]
    names = [Path(item["path"]).stem for item in paths]
    label_of = {val_id(label, i): label for label in range(5) for i in range(3)}
    assert names == sorted(label_of)  # the flat folder's own order (ids interleave the classes)
    assert test["label"] == [label_of[name] for name in names]
    assert test.features["label"].names[:5] == WNIDS and len(test.features["label"].names) == 1000


def test_hub_test_split_without_labels_is_not_the_test_split(fake, tmp_path):
    dm = datamodule(fake, "hub_cache", tmp_path)
    dm.prepare_splits()
    assert len(dm.splits["test"]) == 15 and min(dm.splits["test"]["label"]) == 0  # validation, not the -1 test split


def test_fit_needs_a_training_split_but_test_does_not(fake, tmp_path):
    dm = datamodule(fake, "val_only", tmp_path)
    dm.setup("test")
    with pytest.raises(ValueError, match=r"has no training split, which `fit` needs.*`test` \(evaluate.py\) reads"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"has no 'train' split.*has no training split"):
        dm.train_dataloader()


def test_val_size_default_is_capped_and_a_too_large_one_says_so(fake, tmp_path):
    dm = datamodule(fake, "folders", tmp_path)  # default: min(10,000, a tenth of the 20 training images)
    dm.prepare_splits()
    assert len(dm.splits["validation"]) == 2 and len(dm.splits["train"]) == 18
    dm = datamodule(fake, "folders", tmp_path, val_size=0.25)
    dm.prepare_splits()
    assert len(dm.splits["validation"]) == 5
    with pytest.raises(ValueError, match=r"val_size=10000 holds out 10000 of the 20 training images.*fraction"):
        datamodule(fake, "folders", tmp_path, val_size=10_000).prepare_splits()
    with pytest.raises(ValueError, match=r"val_size as a fraction must be in \(0, 1\), got 1.5"):
        datamodule(fake, "folders", tmp_path, val_size=1.5).prepare_splits()


def test_unknown_layouts_name_the_supported_ones(fake, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not images")
    with pytest.raises(
        FileNotFoundError, match=r"in no ImageNet layout.*class folders.*LOC_val_solution.*save_to_disk.*parquet"
    ):
        datamodule({"junk": tmp_path / "junk"}, "junk", tmp_path).prepare_splits()
    no_csv = tmp_path / "no_csv"
    no_csv.mkdir()
    for file in sorted(fake["flat_beside"].glob("*.JPEG"))[:2]:
        (no_csv / file.name).write_bytes(file.read_bytes())
    with pytest.raises(FileNotFoundError) as error:
        datamodule({"x": no_csv}, "x", tmp_path).prepare_splits()
    message = str(error.value)
    assert "LOC_val_solution.csv or the extracted devkit (ILSVRC2012_devkit_t12/" in message
    assert message.split("neither is in ")[1].startswith(f"{no_csv}, {tmp_path}. Put one beside the images")
    with pytest.raises(FileNotFoundError, match=r"ImageNet folder ./nowhere does not exist \(/.*/nowhere\)\. Supp"):
        ImageNetDataModule(source="./nowhere").prepare_splits()
    with pytest.raises(FileNotFoundError, match=r"no local folder .*not-cached does not exist.*has no copy.*Supp"):
        ImageNetDataModule(source="someone/not-cached", hub_cache_dir=str(tmp_path)).prepare_splits()


@pytest.mark.parametrize("source", ["imagenett", "data/imagenet/vall", "~/imagenett", "data/imagenett"])
def test_a_mistyped_path_fails_at_once_naming_it(source, tmp_path):
    """A relative path that does not exist is no hub lookup: one line at once. Only org/name can be a hub id, and
    offline (as here) it fails at once too, naming both readings."""
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"ImageNet (folder |source '){source}'? .*does not exist"):
        ImageNetDataModule(source=source, hub_cache_dir=str(tmp_path)).prepare_splits()
    assert time.perf_counter() - start < 5.0


def test_kaggle_test_folder_and_devkit_ids_are_read_as_documented(fake, tmp_path):
    dm = datamodule(fake, "kaggle_cls_loc", tmp_path)
    dm.prepare_splits()  # ILSVRC/Data/CLS-LOC/test (unlabelled ILSVRC2012_test_*) is not a split
    assert dm.origins["test"][0] == "validation" and len(dm.splits["test"]) == 15
    # the devkit's IDs (15, 12, 9, 6, 3 for the five wnids) map to wnids through meta.mat, not by their order
    labels = read_devkit_labels(fake["devkit"] / "ILSVRC2012_devkit_t12")
    assert labels == {val_id(label, i): WNIDS[label] for label in range(5) for i in range(3)}


def test_parquet_layout_streams(fake, tmp_path):
    dm = datamodule(fake, "parquet", tmp_path, streaming=True, val_size=3, data_config={"input_size": (3, 32, 32)})
    dm.setup("fit")
    assert all(isinstance(split, datasets.IterableDataset) for split in dm.splits.values())
    assert sum(len(labels) for _, labels in dm.val_dataloader()) == 3
    assert sum(len(labels) for _, labels in dm.train_dataloader()) == 17
    labels = torch.cat([labels for _, labels in dm.test_dataloader()])
    assert labels.tolist() == [label for label in range(5) for _ in range(3)]


def test_plain_parquet_labels_take_their_names_from_the_dataset_card(fake, tmp_path):
    import pyarrow.parquet as pq

    root = tmp_path / "plain"
    (root / "data").mkdir(parents=True)
    table = pq.read_table(fake["parquet"] / "data" / "validation-00000-of-00001.parquet")
    table = table.replace_schema_metadata(None)  # integer labels, no datasets features
    pq.write_table(table, root / "data" / "validation-00000-of-00001.parquet")
    names = "\n".join(f"            '{i}': {wnid}" for i, wnid in enumerate(WNIDS))
    card = "---\ndataset_info:\n  features:\n    - name: image\n      dtype: image\n    - name: label\n"
    (root / "README.md").write_text(card + f"      dtype:\n        class_label:\n          names:\n{names}\n---\n")
    dm = datamodule({"plain": root}, "plain", tmp_path)
    dm.prepare_splits()
    assert dm.splits["test"].features["label"].names == WNIDS
    (root / "README.md").unlink()
    dm = datamodule({"plain": root}, "plain", tmp_path / "other-cache")
    dm.prepare_splits()
    assert dm.num_classes == 1000  # no names anywhere: ImageNet-1k's class indices


def test_a_class_folder_subset_keeps_its_imagenet_labels_and_says_so(fake, tmp_path, caplog):
    dm = datamodule(fake, "subset", tmp_path)
    dm.prepare_splits()
    assert caplog.messages == ["2 of 1,000 classes; labels kept as ImageNet indices"]
    assert Counter(dm.splits["test"]["label"]) == {7: 3, 42: 3}  # not re-indexed 0, 1
    names = dm.splits["test"].features["label"].names
    assert len(names) == 1000 and [names[i] for i in SUBSET.values()] == list(SUBSET)
    whole = datamodule(fake, "folders", tmp_path)
    whole.prepare_splits()
    assert caplog.messages[1:] == ["5 of 1,000 classes; labels kept as ImageNet indices"]
    # a folder that is not an ImageNet wnid: torchvision's order (sorted names), as before
    other = tmp_path / "other"
    for name in ("zebra", "n01514668"):
        (other / "val" / name).mkdir(parents=True)
        for file in sorted((fake["subset"] / "val" / "n01514668").iterdir())[:2]:
            (other / "val" / name / file.name).write_bytes(file.read_bytes())
    dm = datamodule({"other": other}, "other", tmp_path)
    dm.prepare_splits()
    assert dm.splits["test"].features["label"].names == ["n01514668", "zebra"]
    assert len(caplog.messages) == 2


def test_class_map_as_text_or_json_sets_the_labels(fake, tmp_path):
    text = tmp_path / "classes.txt"
    text.write_text("\n".join(reversed(WNIDS)) + "\n\n")  # timm's format: one class per line, its index the line's
    dm = datamodule(fake, "val_only", tmp_path, class_map=str(text))
    dm.prepare_splits()
    assert Counter(dm.splits["test"]["label"]) == {label: 3 for label in range(5)}
    assert dm.splits["test"].features["label"].names == list(reversed(WNIDS))
    by_name = {
        Path(item["path"]).parent.name: label
        for item, label in zip(
            dm.splits["test"].cast_column("image", datasets.Image(decode=False))["image"],
            dm.splits["test"]["label"],
            strict=True,
        )
    }
    assert by_name == {wnid: 4 - i for i, wnid in enumerate(WNIDS)}
    mapping = tmp_path / "classes.json"
    mapping.write_text('{"n01514668": 3, "n01687978": 900}')
    dm = datamodule(fake, "subset", tmp_path, class_map=str(mapping))
    dm.prepare_splits()
    assert Counter(dm.splits["test"]["label"]) == {3: 3, 900: 3} and dm.num_classes == 901
    folder = make_image_folder(tmp_path / "plain", train_per_class=2, test_per_class=2)
    (tmp_path / "plain.txt").write_text("class_2\nclass_0\nclass_1\n")
    plain = ImageFolderDataModule(root=str(folder), val_size=2, class_map=str(tmp_path / "plain.txt"))
    plain.prepare_splits()
    assert Counter(plain.splits["test"]["label"]) == {0: 2, 1: 2, 2: 2}
    assert plain.splits["test"].features["label"].names == ["class_2", "class_0", "class_1"]


def test_class_map_errors_name_the_file_and_the_problem(fake, tmp_path):
    def fails(content: str, suffix: str, match: str, layout: str = "val_only") -> None:
        path = tmp_path / f"map{len(list(tmp_path.iterdir()))}{suffix}"
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            datamodule(fake, layout, tmp_path, class_map=str(path)).prepare_splits()

    fails("\n".join(WNIDS[:4]), ".txt", r"1 classes of ImageNet source .* are not in class_map .* n01494475")
    fails("\n".join([*WNIDS, WNIDS[0]]), ".txt", r"names n01440764 on more than one line")
    fails('{"n01440764": "0"}', ".json", r"maps classes to integers >= 0; got n01440764: '0'")
    fails("[1, 2]", ".json", r"must be a JSON object of class name -> index")
    fails("n01440764", ".csv", r"must be a .txt \(one class per line\) or .json")
    fails("\n".join(WNIDS), ".txt", r"class_map relabels class folders.*is a datasets folder", layout="parquet")
    with pytest.raises(FileNotFoundError, match=r"class_map .*missing.txt does not exist"):
        datamodule(fake, "val_only", tmp_path, class_map=str(tmp_path / "missing.txt")).prepare_splits()
