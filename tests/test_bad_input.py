"""Bad input, table-driven: the API raises ValueError/FileNotFoundError/TypeError naming the input, and every entry
point ends with exit status 2, one line on stderr naming the option and no traceback. Real tiny models
and files throughout; entry points are called in-process through :func:`attnprune.cli.run_cli`, a few as
subprocesses to check what a user sees."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from attnprune import Routing, count_flops, load_model, match_flops, prune, save_model
from attnprune.atomic import staged_dir, write_text_atomic
from attnprune.cli import one_line, run_cli
from attnprune.errors import check_finite, check_finite_outputs
from attnprune.io import METADATA_KEY
from attnprune.lit.data import ImageDataModule, ImageFolderDataModule, check_input_size
from attnprune.lit.modules import PrunedClassifier
from attnprune.search import search_routing
from tests.conftest import TINY_BACKBONE, make_image_folder, script_env, tiny_backbone, tiny_vit

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch16_224"


def entry_point(name: str):
    return importlib.import_module(f"attnprune.cli.{name}")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model's weights, the same weights with NaN and inf, corrupt files, a folder, routings, images."""
    root = tmp_path_factory.mktemp("bad_input")
    model = PrunedClassifier(tiny_backbone()).model
    good = save_model(model, root / "tiny.safetensors", ARCH, model_kwargs=TINY_BACKBONE["model_kwargs"])
    with open(good, "rb") as f:
        head = f.read(8)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(good))
    for bad, value in (("nan", math.nan), ("inf", math.inf)):
        broken = dict(state)
        broken["head.weight"] = torch.full_like(broken["head.weight"], value)
        save_file(broken, str(root / f"{bad}.safetensors"), metadata={METADATA_KEY: meta[METADATA_KEY]})
    overflow = dict(state)  # finite weights whose logits overflow to inf
    overflow["head.weight"] = torch.full_like(overflow["head.weight"], 3e38)
    overflow["norm.bias"] = torch.full_like(overflow["norm.bias"], 10.0)
    save_file(overflow, str(root / "overflow.safetensors"), metadata={METADATA_KEY: meta[METADATA_KEY]})
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    (root / "truncated.safetensors").write_bytes(good.read_bytes()[: len(head) + 100])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "garbage.ckpt").write_bytes(b"\x80\x04garbage")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, root / "other.ckpt")
    (root / "garbage.pth").write_bytes(b"not a zip")
    (root / "folder.safetensors").mkdir()
    save_file(state, str(root / "not-json-meta.safetensors"), metadata={METADATA_KEY: "{architecture: vit"})
    save_file(state, str(root / "list-meta.safetensors"), metadata={METADATA_KEY: "[1, 2]"})
    (root / "text.ckpt").write_text("a text file, not a checkpoint\n")
    (root / "truncated.ckpt").write_bytes((root / "other.ckpt").read_bytes()[:300])
    (root / "folder").mkdir()
    (root / "typo.yaml").write_text(yaml.safe_dump({"rules": [{"layer": 1, "score": "l2_nrom", "keep": 0.5}]}))
    (root / "deep.yaml").write_text(yaml.safe_dump({"rules": [{"layer": 9, "score": "l2_norm", "keep": 0.5}]}))
    (root / "ok.yaml").write_text(yaml.safe_dump({"rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5}]}))
    (root / "broken.yaml").write_text("rules: [{layer: 1, score: l2_norm, keep: 0.5")
    make_image_folder(root / "data", train_per_class=2, test_per_class=2)
    make_image_folder(root / "one-class", train_per_class=2, test_per_class=2, classes=1)
    make_image_folder(root / "no-test-images", train_per_class=2, test_per_class=0)
    make_image_folder(root / "train-only", train_per_class=2, test_per_class=0)
    shutil.rmtree(root / "train-only" / "val")
    make_image_folder(root / "corrupt", train_per_class=3, test_per_class=2)
    for split in ("train", "val"):
        (root / "corrupt" / split / "class_1" / "bad.jpg").write_bytes(b"this is not a JPEG")
    jpeg = root / "corrupt" / "train" / "class_0" / "2.jpg"  # a CMYK JPEG of make_image_folder, cut short
    (root / "truncated").mkdir()
    (root / "truncated" / "cut.jpg").write_bytes(jpeg.read_bytes()[:200])
    return {p.name: p for p in root.iterdir()} | {"root": root}


# -------------------------------------------------------------------------------------------------- API
def _flops(**kw):
    return lambda f: count_flops(tiny_vit(), **kw)


API_CASES = [
    # (id, call, exception, text the message must contain)
    ("flops-img-not-multiple", _flops(img_size=30), ValueError, "img_size 30"),
    ("flops-img-zero", _flops(img_size=0), ValueError, "img_size 0"),
    ("flops-img-negative", _flops(img_size=-32), ValueError, "img_size -32"),
    ("flops-img-pair-not-multiple", _flops(img_size=(32, 30)), ValueError, "img_size (32, 30)"),
    ("flops-img-string", _flops(img_size="big"), TypeError, "img_size must be an int"),
    ("flops-img-float", _flops(img_size=32.0), TypeError, "32.0"),
    ("flops-img-bool", _flops(img_size=True), TypeError, "True"),
    ("flops-img-one-value", _flops(img_size=(32,)), TypeError, "(32,)"),
    ("flops-img-three-values", _flops(img_size=(32, 32, 3)), TypeError, "(32, 32, 3)"),
    ("flops-routing-int", _flops(routing=5), TypeError, "routing must be a Routing"),
    ("flops-routing-deep", lambda f: count_flops(tiny_vit(), Routing.from_yaml(f["deep.yaml"])), ValueError, "9"),
    ("tome-negative-r", lambda f: Routing.tome(-1, 4), ValueError, "r=-1"),
    ("tome-negative-in-schedule", lambda f: Routing.tome([1, -2, 1, 1], 4), ValueError, "r=-2"),
    ("tome-float-r", lambda f: Routing.tome(1.5, 4), ValueError, "r=1.5"),
    ("tome-string-r", lambda f: Routing.tome("3", 4), ValueError, "r='3'"),
    ("tome-schedule-length", lambda f: Routing.tome([1, 1], 4), ValueError, "depth 4"),
    (
        "tome-r-too-large",
        lambda f: prune(tiny_vit(), Routing.tome(100, 4)),
        ValueError,
        "layer 0: r=100, but with 64 non-prefix tokens reaching it 'merge' merges at most r=32",
    ),
    (
        "tome-r-too-large-in-a-late-layer",
        lambda f: count_flops(tiny_vit(), Routing.tome(20, 4)),
        ValueError,
        "layer 2: r=20, but with 24 non-prefix tokens reaching it 'merge' merges at most r=12",
    ),
    (
        "merge-rule-r-1000",
        lambda f: count_flops(tiny_vit(), {"rules": [{"layer": 1, "r": 1000, "reduce": "merge"}]}),
        ValueError,
        "layer 1: r=1000, but with 64 non-prefix tokens reaching it 'merge' merges at most r=32",
    ),
    (
        "merge-rule-keep-below-half",
        lambda f: prune(tiny_vit(), {"rules": [{"layer": 1, "keep": 0.3, "reduce": "merge"}]}),
        ValueError,
        "field 'keep' merges too many tokens at layer 1: keep=0.3 (r=44)",
    ),
    (
        "drop-rule-r-above-tokens",
        lambda f: prune(tiny_vit(), {"rules": [{"layer": 1, "score": "std", "r": 64}]}),
        ValueError,
        "removes 64 tokens but only 64 non-prefix tokens reach layer 1 (at most r=63)",
    ),
    ("tome-num-tokens-zero", lambda f: Routing.tome(2, 4, num_tokens=0), ValueError, "num_tokens=0"),
    (
        "match-flops-no-knob-fits",
        lambda f: match_flops(tiny_vit(), lambda r: Routing.tome(int(r), 4), [40, 50], 0.5),
        ValueError,
        "knobs [40, 50]",
    ),
    ("preset-tome-negative", lambda f: Routing.parse("tome:r=-1", 4), ValueError, "r=-1"),
    ("preset-unknown", lambda f: Routing.parse("tone:r=1", 4), ValueError, "tone"),
    ("preset-missing-keep", lambda f: Routing.parse("evit:", 4), ValueError, "keep"),
    ("prune-int", lambda f: prune(tiny_vit(), 3), TypeError, "routing must be a Routing"),
    ("prune-list", lambda f: prune(tiny_vit(), [{"layer": 1}]), TypeError, "list"),
    (
        "prune-dict-typo",
        lambda f: prune(tiny_vit(), {"rules": [{"layer": 1, "score": "l2_nrom", "keep": 0.5}]}),
        ValueError,
        "l2_nrom",
    ),
    ("prune-dict-unknown-field", lambda f: prune(tiny_vit(), {"rule": []}), ValueError, "'rule'"),
    ("prune-missing-yaml", lambda f: prune(tiny_vit(), str(f["root"] / "nope.yaml")), FileNotFoundError, "nope.yaml"),
    ("prune-yaml-typo", lambda f: prune(tiny_vit(), f["typo.yaml"]), ValueError, "l2_nrom"),
    ("prune-yaml-broken", lambda f: prune(tiny_vit(), f["broken.yaml"]), ValueError, "broken.yaml"),
    ("prune-yaml-deep", lambda f: prune(tiny_vit(), str(f["deep.yaml"])), ValueError, "layer"),
    (
        "prune-keep-above-one",
        lambda f: prune(tiny_vit(), {"rules": [{"layer": 1, "score": "std", "keep": 1.5}]}),
        ValueError,
        "1.5",
    ),
    ("prune-not-a-vit", lambda f: prune(torch.nn.Linear(2, 2), Routing.tome(1, 4)), TypeError, "Linear"),
    ("load-directory", lambda f: load_model(f["folder"]), IsADirectoryError, "folder"),
    (
        "load-directory-with-suffix",
        lambda f: load_model(f["folder.safetensors"]),
        IsADirectoryError,
        "folder.safetensors is a directory",
    ),
    (
        "load-metadata-not-json",
        lambda f: load_model(f["not-json-meta.safetensors"]),
        ValueError,
        "not-json-meta.safetensors: its 'attnprune' metadata is not JSON (Expecting property name",
    ),
    (
        "load-metadata-not-an-object",
        lambda f: load_model(f["list-meta.safetensors"]),
        ValueError,
        "list-meta.safetensors: its 'attnprune' metadata is not a JSON object naming the 'architecture'",
    ),
    ("load-missing", lambda f: load_model(f["root"] / "missing.safetensors"), FileNotFoundError, "missing.safetensors"),
    ("load-garbage-safetensors", lambda f: load_model(f["garbage.safetensors"]), ValueError, "garbage.safetensors"),
    (
        "load-truncated-safetensors",
        lambda f: load_model(f["truncated.safetensors"]),
        ValueError,
        "truncated.safetensors",
    ),
    ("load-empty-safetensors", lambda f: load_model(f["empty.safetensors"]), ValueError, "empty.safetensors"),
    ("load-nan-weights", lambda f: load_model(f["nan.safetensors"]), ValueError, "nan.safetensors"),
    ("load-inf-weights", lambda f: load_model(f["inf.safetensors"]), ValueError, "non-finite"),
    ("load-garbage-ckpt", lambda f: load_model(f["garbage.ckpt"]), ValueError, "garbage.ckpt"),
    ("load-foreign-ckpt", lambda f: load_model(f["other.ckpt"]), ValueError, "other.ckpt"),
    ("load-garbage-pth", lambda f: load_model(f["garbage.pth"], architecture=ARCH), ValueError, "garbage.pth"),
    ("load-pth-no-arch", lambda f: load_model(f["garbage.pth"]), ValueError, "garbage.pth"),
    ("load-unknown-name", lambda f: load_model("not_a_model_xyz"), ValueError, "not_a_model_xyz"),
    ("load-unknown-tag", lambda f: load_model("deit_tiny_patch16_224.nope"), ValueError, "nope"),
    (
        "search-routing-logits-overflow",
        lambda f: search_routing(load_model(f["overflow.safetensors"]), [torch.zeros(2, 3, 16, 16)], 0.6),
        ValueError,
        "the searched model: the model's outputs on validation image 0 hold",
    ),
    (
        "check-finite-outputs",
        lambda f: check_finite_outputs(torch.tensor([[1.0, math.inf]]), "m.bin"),
        ValueError,
        "m.bin: the model's outputs on the first batch hold 1 non-finite values",
    ),
    (
        "folder-one-class",
        lambda f: ImageFolderDataModule(str(f["one-class"]), cache_dir=str(f["root"] / "hf")).prepare_splits(),
        ValueError,
        "one-class has images of 1 class (class_0)",
    ),
    (
        "folder-corrupt-image",
        lambda f: (
            ImageFolderDataModule(str(f["corrupt"]), cache_dir=str(f["root"] / "hf"))
            .for_model(load_model(f["tiny.safetensors"]))
            .take("test", None)
        ),
        ValueError,
        "bad.jpg cannot be read as an image",
    ),
    (
        "folder-truncated-image",
        lambda f: ImageDataModule.make_transform(
            ImageFolderDataModule(str(f["data"]), data_config={"input_size": (3, 16, 16)}), False
        )({"path": str(f["truncated"] / "cut.jpg"), "bytes": None}),
        ValueError,
        "cut.jpg cannot be read as an image",
    ),
    (
        "folder-input-size",
        lambda f: ImageFolderDataModule(str(f["data"]), data_config={"input_size": (3, 32, 32)}).for_model(
            load_model(f["tiny.safetensors"])
        ),
        ValueError,
        "input_size [3, 32, 32] does not fit the model, which takes [3, 16, 16]",
    ),
    (
        "folder-input-channels",
        lambda f: check_input_size(load_model(f["tiny.safetensors"]), (1, 16, 16), "data_config"),
        ValueError,
        "input_size [1, 16, 16]",
    ),
    ("check-finite", lambda f: check_finite({"w": torch.tensor([1.0, math.nan])}, "w.bin"), ValueError, "'w'"),
]


@pytest.mark.parametrize(("call", "error", "text"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input(files, call, error, text):
    with pytest.raises(error) as info:
        call(files)
    assert text in str(info.value)


def test_prune_takes_a_dict_or_a_routing_file(files):
    """What the refusals above leave valid: a dict and a YAML path give the same model as the Routing."""
    x = torch.randn(2, 3, 32, 32)
    expected = prune(tiny_vit(), Routing.from_yaml(files["ok.yaml"]))(x)
    for routing in (yaml.safe_load(files["ok.yaml"].read_text()), files["ok.yaml"], str(files["ok.yaml"])):
        assert torch.equal(prune(tiny_vit(), routing)(x), expected)
    assert count_flops(tiny_vit(), img_size=(32, 16)) < count_flops(tiny_vit(), img_size=32)


def test_one_line_keeps_only_the_error_a_dataloader_worker_raised():
    err = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "data.py", line 1, in apply\nValueError: image file a.jpg cannot be read as an image'
    )
    assert one_line(err) == "image file a.jpg cannot be read as an image"


def test_one_line_drops_jsonargparse_dumps():
    err = ValueError("Problem with given class_path 'x':\n  bad keep 1.5\n  Given value: Namespace(a=1)")
    assert one_line(err) == "bad keep 1.5"


# ------------------------------------------------------------------------------------- entry points in-process
def _data(files, folder: str = "data") -> list[str]:
    return [
        "--data.class_path",
        "attnprune.lit.data.ImageFolderDataModule",
        "--data.init_args.root",
        str(files[folder]),
        "--data.init_args.cache_dir",
        str(files["root"] / "hf"),
    ]


def _out(files, name: str) -> str:
    return str(files["root"] / f"out-{name}" / ("routing.yaml" if name == "search" else ""))


def _logger(files, name: str, folder: str) -> list[str]:
    """A logger writing under out-train/ (the table checks that a failed run leaves no out-* folder)."""
    save_dir = files["root"] / "out-train" / folder
    return ["--trainer.logger", f"lightning.pytorch.loggers.{name}", "--trainer.logger.save_dir", str(save_dir)]


def _analyze(files, *extra):
    out = files["root"] / "out-analyze"
    return "analyze", ["--model", str(files["tiny.safetensors"]), *_data(files), "--output_dir", str(out), *extra]


def _search(files, *extra):
    out = files["root"] / "out-search" / "routing.yaml"
    return "search", ["--model", str(files["tiny.safetensors"]), *_data(files), "--output", str(out), *extra]


def _quickstart(files, *extra):
    return "quickstart", ["--model", str(files["tiny.safetensors"]), *extra]


def _module(files, checkpoint: str, folder: str = "data") -> list[str]:
    return [
        "--model.class_path",
        "attnprune.lit.modules.PrunedClassifier",
        "--model.init_args.backbone.model",
        "auto",
        "--model.init_args.backbone.checkpoint",
        checkpoint,
        *_data(files, folder),
        "--trainer.logger",
        "false",
        "--trainer.accelerator",
        "cpu",
    ]


def _evaluate(files, *extra, checkpoint: str | None = None, folder: str = "data"):
    out = files["root"] / "out-evaluate"
    args = _module(files, checkpoint or str(files["tiny.safetensors"]), folder)
    # the run's own folder (a saved config, logs) is out-evaluate too, so the table sees anything a failure leaves
    return "evaluate", [*args, "--output_dir", str(out), "--trainer.default_root_dir", str(out), *extra]


def _train(files, *extra, checkpoint: str | None = None, folder: str = "data"):
    args = _module(files, checkpoint or str(files["tiny.safetensors"]), folder)
    return "train", ["fit", *args, "--trainer.default_root_dir", str(files["root"] / "out-train"), *extra]


CLI_CASES = [
    ("evaluate-ckpt-missing", lambda f: _evaluate(f, "--ckpt_path", "nope.ckpt"), "nope.ckpt"),
    ("evaluate-ckpt-directory", lambda f: _evaluate(f, "--ckpt_path", str(f["folder"])), "directory"),
    ("evaluate-routing-missing", lambda f: _evaluate(f, "--routings", "[nope.yaml]"), "nope.yaml"),
    ("evaluate-routing-typo", lambda f: _evaluate(f, "--routings", f"[{f['typo.yaml']}]"), "l2_nrom"),
    ("evaluate-routing-too-deep", lambda f: _evaluate(f, "--routings", f"[{f['deep.yaml']}]"), "deep.yaml"),
    ("evaluate-tome-negative", lambda f: _evaluate(f, "--routings", "[tome:r=-1]"), "r=-1"),
    ("evaluate-preset-unknown", lambda f: _evaluate(f, "--routings", "[tone:r=2]"), "tone"),
    ("evaluate-tome-r-too-large", lambda f: _evaluate(f, "--routings", "[tome:r=9]"), "tome:r=9"),
    ("evaluate-throughput-batches-zero", lambda f: _evaluate(f, "--throughput_batches", "0"), "--throughput_batches"),
    ("evaluate-throughput-repeats-negative", lambda f: _evaluate(f, "--throughput_repeats", "-1"), "-1"),
    ("evaluate-nan-model", lambda f: _evaluate(f, checkpoint=str(f["nan.safetensors"])), "non-finite"),
    (
        "evaluate-logits-overflow",
        lambda f: _evaluate(f, checkpoint=str(f["overflow.safetensors"])),
        "overflow.safetensors",
    ),
    ("evaluate-one-class", lambda f: _evaluate(f, folder="one-class"), "one-class"),
    ("evaluate-corrupt-image", lambda f: _evaluate(f, folder="corrupt"), "bad.jpg"),
    (
        "evaluate-corrupt-image-in-a-worker",
        lambda f: _evaluate(f, "--data.init_args.num_workers", "1", folder="corrupt"),
        "bad.jpg",
    ),
    (
        "evaluate-input-size",
        lambda f: _evaluate(f, "--data.init_args.data_config", "{input_size: [3, 32, 32]}"),
        "input_size [3, 32, 32]",
    ),
    ("train-one-class", lambda f: _train(f, folder="one-class"), "one-class"),
    (
        "train-one-class-csv-logger",
        lambda f: _train(f, *_logger(f, "CSVLogger", "logs"), folder="one-class"),
        "one-class",
    ),
    (
        "train-one-class-wandb-logger",
        lambda f: _train(f, *_logger(f, "WandbLogger", "runs"), "--trainer.logger.offline", "true", folder="one-class"),
        "one-class",
    ),
    (
        "train-corrupt-image-csv-logger",
        lambda f: _train(f, *_logger(f, "CSVLogger", "logs"), "--trainer.max_epochs", "1", folder="corrupt"),
        "bad.jpg",
    ),
    ("train-corrupt-image-no-logger", lambda f: _train(f, "--trainer.max_epochs", "1", folder="corrupt"), "bad.jpg"),
    (
        "train-learning-rate-given-twice",
        lambda f: _train(f, "--model.init_args.lr", "0.002", "--optimizer", "SGD", "--optimizer.lr", "0.1"),
        "optimizer.init_args.lr is 0.1 but model.init_args.lr is 0.002",
    ),
    (
        "evaluate-corrupt-image-wandb-logger",
        lambda f: _evaluate(
            f, *_logger(f, "WandbLogger", "runs"), "--trainer.logger.offline", "true", folder="corrupt"
        ),
        "bad.jpg",
    ),
    (
        "train-input-size",
        lambda f: _train(f, "--data.init_args.data_config", "{input_size: [3, 32, 32]}"),
        "input_size [3, 32, 32]",
    ),
    (
        "analyze-input-size",
        lambda f: _analyze(f, "--data.init_args.data_config", "{input_size: [3, 32, 32]}"),
        "input_size [3, 32, 32]",
    ),
    (
        "analyze-one-class",
        lambda f: ("analyze", ["--model", str(f["tiny.safetensors"]), *_data(f, "one-class")]),
        "one-class",
    ),
    (
        "search-input-size",
        lambda f: _search(f, "--budget", "0.5", "--data.init_args.data_config", "{input_size: [3, 32, 32]}"),
        "input_size [3, 32, 32]",
    ),
    ("evaluate-garbage-model", lambda f: _evaluate(f, checkpoint=str(f["garbage.safetensors"])), "garbage.safetensors"),
    ("evaluate-missing-model", lambda f: _evaluate(f, checkpoint="missing.safetensors"), "missing.safetensors"),
    ("evaluate-unknown-option", lambda f: _evaluate(f, "--routingz", "[unpruned]"), "routingz"),
    ("train-routing-typo", lambda f: _train(f, "--model.init_args.backbone.routing", str(f["typo.yaml"])), "l2_nrom"),
    ("train-routing-missing", lambda f: _train(f, "--model.init_args.backbone.routing", "nope.yaml"), "nope.yaml"),
    ("train-nan-model", lambda f: _train(f, checkpoint=str(f["nan.safetensors"])), "non-finite"),
    ("train-missing-config", lambda f: ("train", ["fit", "--config", "nope.yaml"]), "nope.yaml"),
    # (id, builder, text the stderr line must contain)
    ("quickstart-ratio-zero", lambda f: _quickstart(f, "--ratio", "0"), "--ratio"),
    ("quickstart-ratio-negative", lambda f: _quickstart(f, "--ratio", "-1"), "--ratio"),
    ("quickstart-ratio-above-one", lambda f: _quickstart(f, "--ratio", "1.5"), "1.5"),
    ("quickstart-ratio-nan", lambda f: _quickstart(f, "--ratio", "nan"), "--ratio"),
    ("quickstart-ratio-word", lambda f: _quickstart(f, "--ratio", "half"), "half"),
    ("quickstart-test-images-zero", lambda f: _quickstart(f, "--test_images", "0"), "--test_images"),
    ("quickstart-repeats-zero", lambda f: _quickstart(f, "--repeats", "0"), "--repeats"),
    (
        "quickstart-missing-model",
        lambda f: ("quickstart", ["--model", str(f["root"] / "missing.safetensors")]),
        "missing.safetensors",
    ),
    (
        "quickstart-model-of-other-classes",  # the logits overflow of a 10-class model: tests/test_bad_input_api.py
        lambda f: ("quickstart", ["--model", str(f["tiny.safetensors"]), "--test_images", "4", "--repeats", "1"]),
        "has labels up to 9 but the model's head has 3 classes",
    ),
    ("quickstart-directory-model", lambda f: ("quickstart", ["--model", str(f["folder"])]), "directory"),
    ("quickstart-nan-model", lambda f: ("quickstart", ["--model", str(f["nan.safetensors"])]), "non-finite"),
    ("analyze-num-images-zero", lambda f: _analyze(f, "--num_images", "0"), "--num_images"),
    ("analyze-keep-above-one", lambda f: _analyze(f, "--keep", "1.5"), "--keep"),
    ("analyze-token-maps-zero", lambda f: _analyze(f, "--token_map_images", "0"), "--token_map_images"),
    ("analyze-routing-typo", lambda f: _analyze(f, "--routings", f"[{f['typo.yaml']}]"), "l2_nrom"),
    ("analyze-routing-missing", lambda f: _analyze(f, "--routings", "[nope.yaml]"), "nope.yaml"),
    (
        "analyze-logits-overflow",
        lambda f: (
            "analyze",
            ["--model", str(f["overflow.safetensors"]), *_data(f), "--output_dir", _out(f, "analyze")],
        ),
        "overflow.safetensors",
    ),
    ("analyze-nan-model", lambda f: ("analyze", ["--model", str(f["nan.safetensors"]), *_data(f)]), "non-finite"),
    (
        "analyze-garbage-model",
        lambda f: ("analyze", ["--model", str(f["garbage.safetensors"]), *_data(f)]),
        "garbage.safetensors",
    ),
    ("analyze-num-images-word", lambda f: _analyze(f, "--num_images", "many"), "num_images"),
    ("search-val-images-zero", lambda f: _search(f, "--budget", "0.6", "--val_images", "0"), "--val_images"),
    ("search-budget-above-one", lambda f: _search(f, "--budget", "1.5"), "1.5"),
    (
        "search-missing-model",
        lambda f: ("search", ["--model", "x.safetensors", *_data(f), "--budget", "0.5"]),
        "x.safetensors",
    ),
    (
        "search-logits-overflow",
        lambda f: (
            "search",
            ["--model", str(f["overflow.safetensors"]), *_data(f), "--budget", "0.5", "--output", _out(f, "search")],
        ),
        "overflow.safetensors",
    ),
    (
        "search-nan-model",
        lambda f: ("search", ["--model", str(f["nan.safetensors"]), *_data(f), "--budget", "0.5"]),
        "non-finite",
    ),
    ("search-no-budget", lambda f: _search(f), "budget"),
    ("evaluate-no-routings", lambda f: _evaluate(f, "--routings", "[]"), "--routings is empty; give at least one"),
    (
        "evaluate-ckpt-text",
        lambda f: _evaluate(f, "--ckpt_path", str(f["text.ckpt"])),
        "text.ckpt is not a Lightning checkpoint (not a PyTorch zip archive",
    ),
    (
        "evaluate-ckpt-truncated",
        lambda f: _evaluate(f, "--ckpt_path", str(f["truncated.ckpt"])),
        "truncated.ckpt is not a Lightning checkpoint (not a PyTorch zip archive",
    ),
    (
        "evaluate-ckpt-safetensors",
        lambda f: _evaluate(f, "--ckpt_path", str(f["tiny.safetensors"])),
        "a weights file is the model's checkpoint: --model.init_args.backbone.checkpoint",
    ),
    (
        "evaluate-ckpt-foreign",
        lambda f: _evaluate(f, "--ckpt_path", str(f["other.ckpt"])),
        "other.ckpt is not a Lightning checkpoint of a PrunedClassifier (KeyError",
    ),
    (
        "evaluate-model-directory-with-suffix",
        lambda f: _evaluate(f, checkpoint=str(f["folder.safetensors"])),
        "folder.safetensors is a directory",
    ),
    (
        "evaluate-metadata-not-json",
        lambda f: _evaluate(f, checkpoint=str(f["not-json-meta.safetensors"])),
        "not-json-meta.safetensors: its 'attnprune' metadata is not JSON",
    ),
    (
        "evaluate-no-test-images",
        lambda f: _evaluate(f, folder="no-test-images"),
        "no-test-images/val holds no images in class subfolders",
    ),
    (
        "evaluate-no-test-folder",
        lambda f: _evaluate(f, folder="train-only"),
        "train-only has no held-out split (add a test/ or val/ folder)",
    ),
]


@pytest.mark.parametrize("build,text", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_entry_point_refuses_bad_input_in_one_line(files, capsys, monkeypatch, build, text):
    monkeypatch.delenv("ATTNPRUNE_DEBUG", raising=False)
    name, argv = build(files)
    module = entry_point(name)
    with pytest.raises(SystemExit) as info:
        run_cli(module.main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    not_ours = ("warn", "site-packages/", "wandb")  # library warnings, W&B's own report of the offline run
    err = [line for line in err if not any(text in line.lower() for text in not_ours)]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert text in err[0]
    assert "Traceback" not in err[0]
    for out in ("out-analyze", "out-search", "out-evaluate", "out-train"):
        assert not (files["root"] / out).exists(), out


def test_evaluate_restores_a_lightning_checkpoint(files, tmp_path):
    """What the --ckpt_path refusals above leave valid: a checkpoint a Trainer saved."""
    module = PrunedClassifier(tiny_backbone())
    datamodule = ImageFolderDataModule(str(files["data"]), cache_dir=str(files["root"] / "hf"), batch_size=4)
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, **options)
    trainer.fit(module, datamodule)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    name, argv = _evaluate(files, "--ckpt_path", str(tmp_path / "tiny.ckpt"), "--throughput_repeats", "0")
    argv += ["--output_dir", str(tmp_path / "out"), "--trainer.default_root_dir", str(tmp_path / "run")]
    rows = run_cli(entry_point(name).main, argv)
    assert [row["checkpoint"] for row in rows] == [str(tmp_path / "tiny.ckpt")]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == rows


def test_debug_keeps_the_traceback(files, monkeypatch):
    monkeypatch.setenv("ATTNPRUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="--ratio"):
        run_cli(entry_point("quickstart").main, ["--ratio", "0"])
    monkeypatch.delenv("ATTNPRUNE_DEBUG")
    with pytest.raises(ValueError, match="--ratio"):
        run_cli(entry_point("quickstart").main, ["--ratio", "0", "--debug"])


def test_bugs_keep_their_traceback():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(main, [])


# ------------------------------------------------------------------------------------- as a user runs them
SUBPROCESS_CASES = [
    ("quickstart-ratio", lambda f: ["quickstart.py", "--ratio", "1.5"], "--ratio"),
    ("analyze-num-images", lambda f: ["analyze.py", *_analyze(f, "--num_images", "0")[1]], "--num_images"),
    (
        "train-routing-typo",
        lambda f: [
            "train.py",
            "fit",
            "--model.class_path",
            "attnprune.lit.modules.PrunedClassifier",
            "--model.init_args.backbone.model",
            ARCH,
            "--model.init_args.backbone.routing",
            str(f["typo.yaml"]),
            *_data(f),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(f["root"] / "out-train"),
        ],
        "l2_nrom",
    ),
    (
        "evaluate-garbage-model",
        lambda f: ["evaluate.py", *_evaluate(f, checkpoint=str(f["garbage.ckpt"]))[1]],
        "garbage.ckpt",
    ),
    ("search-budget", lambda f: ["search.py", *_search(f, "--budget", "1.5")[1]], "budget"),
]


@pytest.mark.parametrize("build,text", [c[1:] for c in SUBPROCESS_CASES], ids=[c[0] for c in SUBPROCESS_CASES])
def test_command_line_exits_2_with_one_line(files, build, text):
    script, *args = build(files)
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=files["root"],
        env=script_env(PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # Lightning logs "Seed set to 0" before the model is built; warnings are not ours either
    lines = [line for line in result.stderr.strip().splitlines() if "warn" not in line.lower() and "Seed" not in line]
    assert len(lines) == 1 and text in lines[0], result.stderr[-3000:]
    assert "Union subtypes" not in lines[0] and "Namespace(" not in lines[0]
    assert "Traceback" not in result.stderr
    for out in ("out-analyze", "out-search", "out-evaluate", "out-train"):
        assert not (files["root"] / out).exists(), out


# ------------------------------------------------------------------------------------- a hub name offline
def _unreachable_hub(tmp_path) -> dict[str, str]:
    """The environment of a machine without the hub: an endpoint nothing listens on, an empty cache."""
    return {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"}


def test_a_hub_name_offline_fails_at_once(tmp_path, monkeypatch):
    """No minute of retries: the hub is probed once, then the local cache alone is asked."""
    from huggingface_hub import constants

    from attnprune.errors import HubUnavailableError
    from attnprune.hub import hub_reachable

    env = _unreachable_hub(tmp_path)
    monkeypatch.setattr(constants, "ENDPOINT", env["HF_ENDPOINT"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_reachable.cache_clear()
    try:
        start = time.perf_counter()
        with pytest.raises(HubUnavailableError, match="deit_tiny_patch16_224"):
            load_model("deit_tiny_patch16_224")
        assert time.perf_counter() - start < 10
        assert constants.HF_HUB_OFFLINE is False  # offline mode only for the call
    finally:
        hub_reachable.cache_clear()


def test_a_hub_name_offline_fails_at_once_on_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ATTNPRUNE_DEBUG", "HF_"))}
    env.update(_unreachable_hub(tmp_path), PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "quickstart.py"), "--model", "deit_tiny_patch16_224"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "deit_tiny_patch16_224" in lines[0] and "Offline, pass a local file" in lines[0], lines
    assert "Retrying" not in result.stderr
    assert seconds < 60  # the process start and imports; the hub's retries took 46-68 s on their own


# ------------------------------------------------------------------------------------- outputs only on success
def test_a_failed_block_leaves_no_output(tmp_path):
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "out") as stage:
        (stage / "results.json").write_text("{}")
        raise RuntimeError("failed half-way")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(tmp_path / "out") as stage:
        (stage / "results.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "results.json").read_text() == "{}"
    write_text_atomic(tmp_path / "out" / "routing.yaml", "rules: []\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "routing.yaml"]


def test_analyze_writes_its_files_once_it_succeeds(files, capsys):
    out = files["root"] / "analyze-ok"
    name, argv = _analyze(files, "--oracle", "false", "--routings", f"[{files['ok.yaml']}]")  # the split's 1 image
    argv[argv.index("--output_dir") + 1] = str(out)
    run_cli(entry_point(name).main, argv)
    assert {"selectivity.json", "selectivity.csv", "selectivity.png"} <= {p.name for p in out.iterdir()}
    assert not [p for p in files["root"].iterdir() if p.name.endswith(".tmp")]
