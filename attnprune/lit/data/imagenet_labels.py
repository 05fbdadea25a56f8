"""Where the labels of ImageNet's official flat validation folder (``ILSVRC2012_val_*.JPEG``) come from: Kaggle's
``LOC_val_solution.csv``, or the ILSVRC2012 devkit's ``ILSVRC2012_validation_ground_truth.txt`` with its
``meta.mat``; and where each is found from any root its layout documents (the Kaggle tree's root, its
``ILSVRC/Data/CLS-LOC`` folder or the validation folder itself; the folder holding the extracted devkit)."""

from __future__ import annotations

import csv
from pathlib import Path

from attnprune.errors import UserError

__all__ = ["DEVKIT", "VAL_SOLUTION", "find_val_labels", "kaggle_root", "read_devkit_labels", "read_val_solution"]

VAL_SOLUTION = "LOC_val_solution.csv"
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = Path("data") / "ILSVRC2012_validation_ground_truth.txt"


def read_val_solution(path: Path) -> dict[str, str]:
    """Kaggle's ``LOC_val_solution.csv``: image id (``ILSVRC2012_val_00000001``) -> wnid (the first box's class)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise UserError(f"{path} is not Kaggle's {VAL_SOLUTION}: expected the columns ImageId,PredictionString")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


def read_devkit_labels(devkit: Path) -> dict[str, str]:
    """The ILSVRC2012 devkit's validation labels: line i of ``data/ILSVRC2012_validation_ground_truth.txt`` is the
    ILSVRC2012_ID of ``ILSVRC2012_val_{i:08d}``, and ``data/meta.mat`` maps the IDs of its leaf synsets (no
    children) to wnids, as torchvision's ``ImageNet`` reads them. Reading ``meta.mat`` needs scipy.

    Returns:
        image id (``ILSVRC2012_val_00000001``) -> wnid.
    """
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise UserError(f"reading the devkit's {devkit / 'data' / 'meta.mat'} needs scipy: pip install scipy") from err
    synsets = loadmat(str(devkit / "data" / "meta.mat"), squeeze_me=True)["synsets"]
    wnid_of = {
        int(synset["ILSVRC2012_ID"]): str(synset["WNID"]) for synset in synsets if int(synset["num_children"]) == 0
    }
    lines = (devkit / GROUND_TRUTH).read_text().split()
    unknown = sorted({int(line) for line in lines} - set(wnid_of))
    if unknown:
        raise UserError(f"{devkit / GROUND_TRUTH} has ILSVRC2012_IDs without a leaf synset in meta.mat: {unknown[:3]}")
    return {f"ILSVRC2012_val_{i:08d}": wnid_of[int(line)] for i, line in enumerate(lines, 1)}


def kaggle_root(path: Path) -> Path | None:
    """The root of the Kaggle tree ``path`` lies in (the folder holding ``ILSVRC/Data/CLS-LOC``), if any."""
    for folder in (path, *path.parents):
        if folder.name == "CLS-LOC" and folder.parent.name == "Data" and folder.parent.parent.name == "ILSVRC":
            return folder.parent.parent.parent
    return None


def find_val_labels(folder: Path, extra_dirs: list[Path]) -> tuple[dict[str, str], Path]:
    """The labels of the flat validation folder ``folder``: Kaggle's ``LOC_val_solution.csv`` or the extracted
    devkit (``ILSVRC2012_devkit_t12/``), looked for in ``folder``, its parent, ``extra_dirs`` and the root of the
    Kaggle tree it lies in, in that order.

    Returns:
        image id -> wnid, and the file read.

    Raises:
        FileNotFoundError: neither file is in any of those folders (each named once).
    """
    places = [folder, folder.parent, *extra_dirs, kaggle_root(folder.absolute())]
    places = list(dict.fromkeys(place.absolute() for place in places if place is not None))
    for place in places:
        if (place / VAL_SOLUTION).is_file():
            return read_val_solution(place / VAL_SOLUTION), place / VAL_SOLUTION
        for devkit in (place / DEVKIT, place):
            if (devkit / GROUND_TRUTH).is_file():
                return read_devkit_labels(devkit), devkit / GROUND_TRUTH
    raise FileNotFoundError(
        f"{folder} is ImageNet's flat validation folder (ILSVRC2012_val_*.JPEG), whose labels are in Kaggle's "
        f"{VAL_SOLUTION} or the extracted devkit ({DEVKIT}/{GROUND_TRUTH.as_posix()} with data/meta.mat); neither is "
        f"in {', '.join(str(place) for place in places)}. Put one beside the images or in their parent folder, or sort "
        "the images into val/<wnid>/ folders"
    )
