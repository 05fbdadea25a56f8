"""ImageNet-1k in every layout users have it: class folders, the official flat validation folder with Kaggle's
``LOC_val_solution.csv`` or the devkit (Kaggle's tree from any of its roots), ``save_to_disk`` folders, the hub's
parquet layout, or a hub id (read from the local cache when offline)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import pyarrow.compute as pc
import yaml
from lightning.pytorch.utilities import rank_zero_info
from timm.data import ImageNetInfo

from attnprune.errors import UserError
from attnprune.hub import hub_reachable
from attnprune.lit.data.folders import (
    SPLIT_FOLDERS,
    ImageFolderDataModule,
    class_folders,
    class_names,
    image_dataset,
    is_image,
)
from attnprune.lit.data.imagenet_labels import DEVKIT, VAL_SOLUTION, find_val_labels
from attnprune.strict_yaml import load_yaml

__all__ = ["IMAGENET_LAYOUTS", "ImageNetDataModule", "imagenet_index"]

WNID = re.compile(r"n\d{8}")
FLAT_VAL = re.compile(r"ILSVRC2012_val_\d+", re.IGNORECASE)
FLAT_TEST = re.compile(r"ILSVRC2012_test_\d+", re.IGNORECASE)  # the official test images: no labels
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
IMAGENET_LAYOUTS = (
    "class folders: <root>/train/<wnid>/*.JPEG and/or <root>/val/<wnid>/*.JPEG (or test/), or <root>/<wnid>/*.JPEG "
    "alone for evaluation",
    f"the official flat validation folder: ILSVRC2012_val_*.JPEG (in <root>, <root>/val or <root>/ILSVRC2012_img_val) "
    f"labelled by Kaggle's {VAL_SOLUTION} or the extracted devkit ({DEVKIT}/) beside the images or in their parent "
    "folder; Kaggle's tree from its root, its ILSVRC/Data/CLS-LOC folder or the validation folder",
    "a datasets save_to_disk folder (dataset_dict.json or state.json)",
    "a folder of parquet files in the hub's layout: <root>/data/{train,validation,test}-*.parquet",
    "a hub dataset id org/name such as ILSVRC/imagenet-1k (read from the local Hugging Face cache when offline)",
)


def _is_flat(folder: Path, pattern: re.Pattern) -> bool:
    return folder.is_dir() and any(pattern.match(entry.name) for entry in folder.iterdir() if is_image(entry))


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k in any layout users have it, with labels in timm's class order (sorted wnids): class folders that
    are all ImageNet-1k wnids keep their ImageNet index, a subset of them included (said in one line).

    Layouts (``source``):

    - class folders: ``train/<wnid>/`` and/or ``val/<wnid>/`` (or ``test/``), or the ``<wnid>/`` folders alone;
    - the official flat validation folder (``ILSVRC2012_val_*.JPEG``) labelled by Kaggle's ``LOC_val_solution.csv``
      or the extracted devkit beside the images or in their parent folder (Kaggle's tree from its root, its
      ``ILSVRC/Data/CLS-LOC`` or its ``val``), with or without ``train/<wnid>/`` beside it;
    - a ``datasets`` ``save_to_disk`` folder;
    - a folder of parquet files in the hub's layout (``data/validation-*.parquet``, ...);
    - a hub dataset id (gated: ``huggingface-cli login``), read from the local Hugging Face cache when offline.

    The source's validation split (50,000 images) is our test split; ``val_size`` training images are held out as
    our validation split. Without training images only ``test`` works (``fit`` and ``validate`` raise).

    Args:
        source: a local folder in one of the layouts above, or a hub dataset id.
        streaming: stream the hub dataset instead of downloading it (``val_size`` must then be a count).
        val_size: training images held out for validation; default 10,000 or a tenth of the training split,
            whichever is smaller.
        hub_cache_dir: Hugging Face hub cache searched for a hub id's files (default: ``HF_HUB_CACHE``).
        **kwargs: see :class:`ImageFolderDataModule` (``cache_dir``, ``class_map``) and :class:`ImageDataModule`
            (``search_split`` carves a search split out of the validation images, for val-only ImageNet).
    """

    HELD_OUT = ("validation", "test")  # the hub's ImageNet test split has no labels
    # the official archives extract to ILSVRC2012_img_train/ and ILSVRC2012_img_val/
    SPLIT_NAMES = {
        "train": (*SPLIT_FOLDERS["train"], "ILSVRC2012_img_train"),
        "validation": (*SPLIT_FOLDERS["validation"], "ILSVRC2012_img_val"),
        "test": SPLIT_FOLDERS["test"],
    }
    DEFAULT_VAL_IMAGES = 10_000

    def __init__(
        self,
        source: str = "ILSVRC/imagenet-1k",
        streaming: bool = False,
        val_size: int | float | None = None,
        hub_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=source, val_size=val_size, **kwargs)
        self.source, self.streaming, self.hub_cache_dir = source, streaming, hub_cache_dir

    def describe_source(self) -> str:
        return f"ImageNet source {self.source}"

    def class_index(self, found: set[str]) -> dict[str, int]:
        """ImageNet-1k's index (timm's class order) when every class found is one of its wnids, so a subset keeps
        the labels the model was trained with (said in one line); else ``class_map``'s, else the sorted names'."""
        wnids = imagenet_index()
        if self.class_map is not None or not found or not found <= set(wnids):
            return super().class_index(found)
        if len(found) < len(wnids):
            rank_zero_info(f"{len(found):,} of {len(wnids):,} classes; labels kept as ImageNet indices")
        return wnids

    def _refuse_class_map(self, layout: str) -> None:
        if self.class_map is not None:
            raise UserError(
                f"class_map relabels class folders and the flat validation folder; {self.describe_source()} is "
                f"{layout}, whose labels are in the data: leave class_map out"
            )

    def layouts_hint(self) -> str:
        return "Supported layouts: " + "; ".join(f"({i}) {text}" for i, text in enumerate(IMAGENET_LAYOUTS, 1))

    def load_source(self) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        path = Path(self.source).expanduser()
        if path.is_dir():
            return self._load_local(path)
        if path.exists():
            raise NotADirectoryError(f"ImageNet source {self.source} is a file; expected a folder or a hub dataset id")
        if not HUB_ID.fullmatch(self.source):  # a mistyped path, not a hub id: no hub lookup
            raise FileNotFoundError(
                f"ImageNet folder {self.source} does not exist ({path.absolute()}). {self.layouts_hint()}"
            )
        return self._load_hub()

    # ----------------------------------------------------------------------------------------------- local
    def _load_local(self, root: Path) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(root))
            # a single saved split is taken as the held-out one
            return self._with_labels(dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"test": loaded})
        parquet = self._parquet_files(root)
        if parquet:
            return self._load_parquet(root, parquet)
        kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
        data_root = kaggle if kaggle.is_dir() else root
        folders = {split: f for split, f in self._split_folders(data_root).items() if not _is_flat(f, FLAT_TEST)}
        if not folders:
            if _is_flat(data_root, FLAT_VAL):
                return {"validation": self._flat_val(data_root, extra_dirs=[root])}
            if any(WNID.fullmatch(name) for name in class_folders(data_root)):
                return self._class_folder_splits({"validation": data_root})
            raise FileNotFoundError(f"{root} is in no ImageNet layout this module reads. {self.layouts_hint()}")
        flat = {split: folder for split, folder in folders.items() if split != "train" and _is_flat(folder, FLAT_VAL)}
        class_splits = {split: folder for split, folder in folders.items() if split not in flat}
        labels = {split: find_val_labels(folder, [root]) for split, folder in flat.items()}
        wnids = set().union(*(class_folders(folder) for folder in class_splits.values()))
        for wnid_of, _ in labels.values():
            wnids |= set(wnid_of.values())
        index = self.class_index(wnids)
        splits = self._class_folder_splits(class_splits, index) if class_splits else {}
        for split, folder in flat.items():
            splits[split] = self._flat_val(folder, index=index, labels=labels[split])
        return splits

    def _flat_val(
        self,
        folder: Path,
        index: dict[str, int] | None = None,
        labels: tuple[dict[str, str], Path] | None = None,
        extra_dirs: list[Path] = (),
    ) -> datasets.Dataset:
        """The flat validation folder, labelled by ``labels`` (image id -> wnid, and the file it was read from;
        default :func:`find_val_labels`), each wnid's label by ``index`` (default :meth:`class_index`)."""
        wnid_of, source = labels or find_val_labels(folder, list(extra_dirs))
        index = index or self.class_index(set(wnid_of.values()))
        files = sorted(entry for entry in folder.iterdir() if is_image(entry) and FLAT_VAL.match(entry.name))
        missing = [file.name for file in files if file.stem not in wnid_of]
        if missing:
            raise UserError(
                f"{len(missing)} images of {folder} have no label in {source} (for example {', '.join(missing[:3])})"
            )
        return image_dataset([str(file) for file in files], [index[wnid_of[f.stem]] for f in files], class_names(index))

    @staticmethod
    def _parquet_files(root: Path) -> dict[str, list[str]]:
        """Parquet files per split: ``data/<split>-*.parquet`` (the hub's layout), ``<split>-*.parquet`` or
        ``[data/]<split>/*.parquet``."""
        names = {name: split for split, aliases in SPLIT_FOLDERS.items() for name in aliases}
        found: dict[str, list[str]] = {}
        for folder in (root / "data", root):
            if not folder.is_dir():
                continue
            for file in sorted(folder.glob("*.parquet")):
                split = names.get(re.split(r"[-_.]", file.name, maxsplit=1)[0].lower())
                if split is not None:
                    found.setdefault(split, []).append(str(file))
            for name, split in names.items():
                found.setdefault(split, []).extend(sorted(str(f) for f in (folder / name).glob("*.parquet")))
        return {split: files for split, files in found.items() if files}

    def _load_parquet(self, root: Path, files: dict[str, list[str]]) -> dict[str, Any]:
        loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=self.cache_dir, streaming=self.streaming)
        return self._with_labels(dict(loaded), readme=root / "README.md")

    def _with_labels(self, splits: dict[str, Any], readme: Path | None = None) -> dict[str, Any]:
        """Check every split has ``image`` and ``label`` columns; a plain integer label becomes a ``ClassLabel`` (with
        the class names of the hub card's ``dataset_info`` when there is one)."""
        self._refuse_class_map("a datasets folder (save_to_disk or parquet)")
        for split, data in splits.items():
            columns = set(data.features or {})
            if not {"image", "label"} <= columns:
                raise UserError(
                    f"split {split!r} of {self.describe_source()} has columns {sorted(columns)}; an ImageNet dataset "
                    "needs 'image' and 'label' columns"
                )
            if not isinstance(data.features["label"], datasets.ClassLabel):
                names = _card_class_names(readme) if readme is not None else None
                if names is None:  # integer labels without names: ImageNet-1k's class indices
                    tops = [pc.max(d.data.column("label")).as_py() for d in splits.values() if hasattr(d, "data")]
                    names = [str(i) for i in range(max([1000] + [top + 1 for top in tops if top is not None]))]
                splits[split] = data.cast_column("label", datasets.ClassLabel(names=names))
        return splits

    # ------------------------------------------------------------------------------------------------- hub
    def _load_hub(self) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
        self._refuse_class_map("a hub dataset")
        offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        snapshot = self._hub_snapshot()
        if snapshot is not None and (offline or not hub_reachable()):
            return self._load_local(snapshot)
        if not offline and not hub_reachable():  # the hub client would retry for about a minute
            raise FileNotFoundError(self._not_found("the hub cannot be reached"))
        try:
            source = datasets.load_dataset(self.source, streaming=self.streaming, cache_dir=self.cache_dir)
        except Exception as err:  # offline, gated, unknown id: all end the same way for the user
            if snapshot is not None:
                return self._load_local(snapshot)
            raise FileNotFoundError(self._not_found(f"{type(err).__name__}: {err}")) from err
        return {split: source[split] for split in source}

    def _not_found(self, reason: str) -> str:
        return (
            f"ImageNet source {self.source!r} is no local folder ({Path(self.source).absolute()} does not exist), "
            f"and as a hub dataset id it could not be loaded ({reason}) and the local Hugging Face cache has no copy "
            "of it. Give a local folder with train/<wnid>/ and val/ or another layout below "
            "(source=/path/to/imagenet), or log in to the Hugging Face hub (huggingface-cli login) with access to "
            f"ILSVRC/imagenet-1k. {self.layouts_hint()}"
        )

    def _hub_snapshot(self) -> Path | None:
        """The hub id's files in the local Hugging Face cache, if any were downloaded."""
        try:
            path = huggingface_hub.snapshot_download(
                self.source, repo_type="dataset", cache_dir=self.hub_cache_dir, local_files_only=True
            )
        except Exception:  # not in the cache (LocalEntryNotFoundError), or not a valid id
            return None
        path = Path(path)
        return path if self._parquet_files(path) or (path / "dataset_dict.json").is_file() else None


@functools.cache
def imagenet_index() -> dict[str, int]:
    """ImageNet-1k's wnids -> class index, in timm's order (the sorted wnids)."""
    return {wnid: i for i, wnid in enumerate(ImageNetInfo("imagenet-1k").label_names())}


def _card_class_names(readme: Path) -> list[str] | None:
    """Class names of the ``label`` feature in a hub dataset card's YAML header, if it has them."""
    if not readme.is_file():
        return None
    text = readme.read_text()
    if not text.startswith("---"):
        return None
    try:
        header = load_yaml(text.split("---", 2)[1]) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{readme}: its YAML header cannot be read: {err}") from err
    infos = header.get("dataset_info", [])
    for info in infos if isinstance(infos, list) else [infos]:
        for feature in info.get("features", []):
            if feature.get("name") == "label" and "class_label" in feature.get("dtype", {}):
                names = feature["dtype"]["class_label"]["names"]
                return [names[k] for k in sorted(names, key=int)] if isinstance(names, dict) else list(names)
    return None
