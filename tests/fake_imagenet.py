"""A tiny fake ImageNet in every layout users have it: class folders, val/ only, the official flat validation folder
with Kaggle's LOC_val_solution.csv, a datasets save_to_disk folder, the hub's parquet layout and a hub id in a local
Hugging Face cache, Kaggle's tree, the official archives with the devkit, and a 2-class subset of other wnids. Five
real wnids (ImageNet-1k's first five); RGB, grayscale and CMYK JPEGs of several sizes whose colour depends on the class.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import datasets
import numpy as np
import scipy.io
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "tiger shark", "hammerhead"]
MODES = ("RGB", "L", "CMYK")
SUBSET = {"n01514668": 7, "n01687978": 42}  # two real wnids and their ImageNet-1k indices (timm's class order)
HUB_ID = "ILSVRC/imagenet-1k"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _image(rng: np.random.Generator, label: int, i: int) -> Image.Image:
    height, width = 24 + 6 * i, 30 + 4 * label  # several sizes and aspect ratios
    colour = np.array([(label * 50) % 256, (255 - label * 40) % 256, (label * 90) % 256])
    pixels = rng.integers(0, 70, (height, width, 3)) + colour * 0.7
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").convert(MODES[(i + label) % 3])


def val_id(label: int, i: int) -> str:
    """Validation ids interleave the classes, as the official ones do: the flat folder's order is not class order."""
    return f"ILSVRC2012_val_{i * len(WNIDS) + label + 1:08d}"


def _hub_dataset(files: list[tuple[Path, int]]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    images = [{"bytes": path.read_bytes(), "path": path.name} for path, _ in files]
    return datasets.Dataset.from_dict({"image": images, "label": [label for _, label in files]}, features=features)


def _kaggle_and_devkit(root: Path, folders: Path, flat: Path, val_files: list, layouts: dict[str, Path]) -> None:
    """Kaggle's tree (LOC_val_solution.csv at its root; ILSVRC/Data/CLS-LOC/{train/<wnid>, val flat, test flat and
    unlabelled}) and the official flat folder with the extracted ILSVRC2012 devkit beside it, whose ILSVRC2012_IDs are
    not in wnid order and whose meta.mat has a synset with children (not a class)."""
    kaggle = root / "kaggle"
    cls_loc = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(folders / "train", cls_loc / "train")
    shutil.copytree(flat / "val", cls_loc / "val")
    (cls_loc / "test").mkdir()
    for i, (path, _) in enumerate(val_files[:2]):
        shutil.copy(path, cls_loc / "test" / f"ILSVRC2012_test_{i + 1:08d}.JPEG")
    shutil.copy(flat / "LOC_val_solution.csv", kaggle / "LOC_val_solution.csv")
    layouts.update(kaggle=kaggle, kaggle_cls_loc=cls_loc, kaggle_val=cls_loc / "val")

    devkit = root / "devkit"
    shutil.copytree(flat / "val", devkit / "ILSVRC2012_img_val")
    data = devkit / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids = {wnid: 3 * (len(WNIDS) - i) for i, wnid in enumerate(WNIDS)}  # 15, 12, 9, 6, 3
    fields = ["ILSVRC2012_ID", "WNID", "words", "num_children"]
    synsets = np.zeros(len(WNIDS) + 1, dtype=[(field, "O") for field in fields])
    for i, wnid in enumerate(WNIDS):
        synsets[i] = (ids[wnid], wnid, NAMES[i], 0)
    synsets[-1] = (1001, "n00000001", "fish", 2)  # an inner synset: ignored
    scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets})
    count = len(val_files)  # val ids 1..15 interleave the classes: image n is of class (n - 1) % 5
    truth = [str(ids[WNIDS[(n - 1) % len(WNIDS)]]) for n in range(1, count + 1)]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")
    layouts.update(devkit=devkit, devkit_val=devkit / "ILSVRC2012_img_val")


def make_fake_imagenet(root: Path, train_per_class: int = 4, val_per_class: int = 3) -> dict[str, Path]:
    """Build every layout under ``root``; returns layout name -> the ``source`` to give ``ImageNetDataModule``.

    ``reference`` is ``val/<wnid>/`` for torchvision's ``ImageFolder``; all layouts hold the same validation images
    (the same JPEG bytes) and, where they have one, the same training images.
    """
    rng = np.random.default_rng(0)
    folders = root / "folders"
    train_files, val_files = [], []
    for label, wnid in enumerate(WNIDS):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            (folders / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"{val_id(label, i)}.JPEG"
                path = folders / split / wnid / name
                _image(rng, label, i).save(path, quality=90)
                (train_files if split == "train" else val_files).append((path, label))
    layouts = {"folders": folders, "reference": folders / "val"}

    layouts["val_only"] = root / "val_only"
    shutil.copytree(folders / "val", root / "val_only" / "val")
    # a 2-class subset: the images of the first two classes under the wnids of ImageNet classes 7 and 42
    layouts["subset"] = root / "subset"
    for wnid, source in zip(SUBSET, WNIDS[:2], strict=True):
        shutil.copytree(folders / "val" / source, root / "subset" / "val" / wnid)

    # official flat folder, solution file in the parent folder, training class folders beside it
    flat = root / "flat"
    (flat / "val").mkdir(parents=True)
    shutil.copytree(folders / "train", flat / "train")
    rows = []
    for path, label in val_files:
        shutil.copy(path, flat / "val" / path.name)
        box = f"{WNIDS[label]} 10 12 20 22"
        rows.append({"ImageId": path.stem, "PredictionString": f"{box} {box}"})
    rows.sort(key=lambda row: row["ImageId"])
    with open(flat / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ImageId", "PredictionString"])
        writer.writeheader()
        writer.writerows(rows)
    layouts["flat"] = flat
    # the flat folder alone, solution file beside the images
    beside = root / "flat_beside"
    shutil.copytree(flat / "val", beside)
    shutil.copy(flat / "LOC_val_solution.csv", beside / "LOC_val_solution.csv")
    layouts["flat_beside"] = beside

    _kaggle_and_devkit(root, folders, flat, val_files, layouts)

    hub = datasets.DatasetDict({"train": _hub_dataset(train_files), "validation": _hub_dataset(val_files)})
    hub.save_to_disk(str(root / "disk"))
    layouts["disk"] = root / "disk"

    parquet = root / "parquet"
    (parquet / "data").mkdir(parents=True)
    hub["train"].to_parquet(str(parquet / "data" / "train-00000-of-00001.parquet"))
    hub["validation"].to_parquet(str(parquet / "data" / "validation-00000-of-00001.parquet"))
    layouts["parquet"] = parquet

    # a hub id in a local Hugging Face hub cache; its test split has no labels (-1), as the hub's has
    cache = root / "hub-cache"
    repo = cache / f"datasets--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_COMMIT
    shutil.copytree(parquet, snapshot)
    unlabelled = _hub_dataset(val_files[:2]).cast_column("label", datasets.Value("int64"))
    unlabelled = unlabelled.map(lambda _: {"label": -1})
    unlabelled.cast_column("label", datasets.ClassLabel(names=NAMES)).to_parquet(
        str(snapshot / "data" / "test-00000-of-00001.parquet")
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    layouts["hub_cache"] = cache
    return layouts
