"""Bad input that used to pass silently (a wrong answer that looks right), table-driven beside
``tests/test_bad_input.py`` and reusing its files: each case asserts the exact one-line message, and that nothing was
written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attnprune import Routing, load_model, match_flops, prune, save_model
from attnprune.cli import run_cli
from attnprune.errors import UserError
from attnprune.lit.backbone import Backbone
from attnprune.lit.data import FashionMNISTDataModule, ImageDataModule, ImageFolderDataModule
from attnprune.lit.modules import LinearProbe, PrunedClassifier
from attnprune.lit.pretraining import MAEPretraining
from attnprune.scoring import SCORERS
from attnprune.selectivity import SelectivityAnalyzer, functional
from tests.conftest import TINY_BACKBONE, tiny_backbone, tiny_vit
from tests.test_bad_input import (  # noqa: F401 (files: the fixture)
    _analyze,
    _evaluate,
    _search,
    _train,
    entry_point,
    files,
)

OUTPUTS = ("out-analyze", "out-search", "out-evaluate", "out-train", "out-quickstart")


def _checkpoint(f, **fields) -> Backbone:
    """The tiny 3-class supervised model's file as a backbone, with ``fields``."""
    return Backbone(model="auto", checkpoint=str(f["tiny.safetensors"]), **fields)


def _new_head(f, requested: int = 12) -> str:
    return (
        f"backbone.num_classes is {requested} but checkpoint {f['tiny.safetensors']} has a trained 3-class head, "
        f"which {requested} classes would replace by a random one; set backbone.new_head true to fine-tune a new "
        "head, or leave num_classes unset"
    )


def _paradigm(f, given: str = "mae") -> str:
    return (
        f"backbone.paradigm is {given!r} but checkpoint {f['tiny.safetensors']} was trained as 'supervised'; leave "
        "paradigm unset to take the checkpoint's"
    )


@pytest.fixture(scope="module")
def more_files(files) -> None:  # noqa: F811
    """Beside ``files``: a class map labelling the 3 class folders of ``files["data"]`` 0, 1 and 5 (the tiny model
    has 3 classes), and a 10-class model (Fashion-MNIST's classes) whose logits overflow to inf."""
    (files["root"] / "labels-beyond.json").write_text('{"class_0": 0, "class_1": 1, "class_2": 5}')
    backbone = tiny_backbone(num_classes=10)
    model = backbone.build()[0]
    with torch.no_grad():
        model.head.weight.fill_(3e38)
        model.norm.bias.fill_(10.0)
    save_model(model, files["root"] / "overflow10.safetensors", backbone.model, model_kwargs=backbone.model_kwargs)
    for name, text in YAML_FILES.items():
        (files["root"] / name).write_text(text)


RULE = "{layer: 1, score: l2_norm, keep: 0.5}"
YAML_FILES = {
    "rules-mapping.yaml": "name: x\nrules: {}\n",
    "rules-empty.yaml": "name: x\nrules:\n",
    "rules-twice.yaml": f"name: x\nrules:\n  - {RULE}\nrules:\n  - {{layer: 2, score: std, keep: 0.5}}\n",
    "layer-twice.yaml": "rules:\n  - {layer: 1, layer: 2, score: l2_norm, keep: 0.5}\n",
    "trainer-twice.yaml": "trainer:\n  max_epochs: 1\nmodel:\n  init_args: {lr: 0.1}\ntrainer:\n  max_epochs: 2\n",
}


def _yaml(f, name: str, error: str) -> str:
    return f"{f['root'] / name}: {error}"


def _folder(f, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(f["data"]), cache_dir=str(f["root"] / "hf"), **kwargs)


def _fewer_classes(f, head: int = 10) -> str:
    return (
        f"image folder {f['data']} has 3 classes but the model's head has {head}, and no class_map says which of the "
        "model's classes they are (sorted folder names would be labels 0 to 2); give class_map: a .txt file of one "
        "class per line or a .json file of folder name -> label"
    )


def _beyond_head(f) -> str:
    return (
        f"image folder {f['data']} has labels up to 5 but the model's head has 3 classes (0 to 2): labels 3 to 5 "
        "are beyond it"
    )


def _rows(function: str, rows: list[list[float]]):
    """A call of the selectivity function ``function`` on ``rows`` (twice for ``spearman``)."""
    x = torch.tensor(rows)
    return lambda f: getattr(functional, function)(*([x, x] if function == "spearman" else [x]))


RULES_LIST = "routing field 'rules' must be a list of rules ([] for none)"

API_CASES = [
    # (id, call, exception, the exact message)
    ("backbone-num-classes-replaces-head", lambda f: _checkpoint(f, num_classes=12).build(), UserError, _new_head),
    ("backbone-paradigm-not-the-checkpoints", lambda f: _checkpoint(f, paradigm="mae").build(), UserError, _paradigm),
    (
        "routing-yaml-rules-a-mapping",
        lambda f: Routing.from_yaml(f["root"] / "rules-mapping.yaml"),
        UserError,
        lambda f: _yaml(f, "rules-mapping.yaml", f"{RULES_LIST}, got dict {{}}"),
    ),
    (
        "routing-yaml-rules-empty",
        lambda f: Routing.from_yaml(f["root"] / "rules-empty.yaml"),
        UserError,
        lambda f: _yaml(f, "rules-empty.yaml", f"{RULES_LIST}, got nothing (an empty 'rules:')"),
    ),
    (
        "routing-yaml-rules-twice",
        lambda f: Routing.from_yaml(f["root"] / "rules-twice.yaml"),
        UserError,
        lambda f: _yaml(f, "rules-twice.yaml", "key 'rules' is given twice (lines 2 and 4)"),
    ),
    (
        "routing-yaml-key-twice-in-a-rule",
        lambda f: prune(tiny_vit(), f["root"] / "layer-twice.yaml"),
        UserError,
        lambda f: _yaml(f, "layer-twice.yaml", "key 'layer' is given twice (lines 2 and 2)"),
    ),
    (
        "routing-dict-rules-none",
        lambda f: prune(tiny_vit(), {"rules": None}),
        UserError,
        lambda f: f"{RULES_LIST}, got nothing (an empty 'rules:')",
    ),
    (
        "preset-argument-twice",
        lambda f: Routing.parse("tome:r=2,r=3", 4),
        UserError,
        lambda f: "routing preset 'tome:r=2,r=3': argument 'r' is given twice (tome:r=<tokens merged per block>)",
    ),
    (
        "train-mixup-negative",
        lambda f: PrunedClassifier(tiny_backbone(), mixup=-1.0),
        UserError,
        lambda f: "PrunedClassifier mixup must be a number of at least 0, got -1.0",
    ),
    (
        "train-layer-decay-zero",
        lambda f: PrunedClassifier(tiny_backbone(), layer_decay=0.0),
        UserError,
        lambda f: "PrunedClassifier layer_decay must be a number in (0, 1], got 0.0",
    ),
    (
        "probe-momentum-one",
        lambda f: LinearProbe(3, _checkpoint(f), momentum=1.0),
        UserError,
        lambda f: "LinearProbe momentum must be a number in [0, 1), got 1.0",
    ),
    (
        "pretraining-weight-decay-negative",
        lambda f: MAEPretraining(TINY_BACKBONE["model"], TINY_BACKBONE["model_kwargs"], weight_decay=-0.05),
        UserError,
        lambda f: "MAEPretraining weight_decay must be a number of at least 0, got -0.05",
    ),
    (
        "depth-zero",
        lambda f: tiny_backbone(model_kwargs={**TINY_BACKBONE["model_kwargs"], "depth": 0}).build(),
        UserError,
        lambda f: f"{TINY_BACKBONE['model']} model_kwargs depth must be an integer of at least 1, got 0",
    ),
    (
        "tome-depth-zero",
        lambda f: Routing.tome(2, 0),
        UserError,
        lambda f: "ToMe's depth must be the model's number of blocks (an integer >= 1), got 0",
    ),
    (
        "evit-no-layers",
        lambda f: Routing.evit(0.7, layers=[]),
        UserError,
        lambda f: "EViT's layers must name at least one block, got []",
    ),
    (
        "mctf-no-layers",
        lambda f: Routing.mctf(4, layers=()),
        UserError,
        lambda f: "MCTF's layers must name at least one block, got []",
    ),
    *[
        (
            f"match-flops-ratio-{ratio}",
            lambda f, ratio=ratio: match_flops(tiny_vit(), lambda r: Routing.tome(int(r), 4), range(1, 9), ratio),
            UserError,
            lambda f, ratio=ratio: f"match_flops ratio (of the unpruned FLOPs) must be a number in (0, 1], got {ratio}",
        )
        for ratio in (0, -1, math.nan, 5)
    ],
    (
        "routing-seed-2-to-the-70",
        lambda f: prune(tiny_vit(), {"rules": [{"layer": 1, "score": "random", "keep": 0.5}], "seed": 2**70}),
        UserError,
        lambda f: f"routing field 'seed' must be an integer in [0, 4294967295], got {2**70}",
    ),
    *[
        (f"selectivity-{function}-{kind}", _rows(function, rows), UserError, lambda f, m=f"{function}: {message}": m)
        for function, kind, rows, message in (
            (
                "normalized_entropy",
                "row-sum-2",
                [[0.5, 1.5]],
                "attention rows must sum to 1 over the last dim, got a row summing to 2",
            ),
            ("gini", "negative", [[1.2, -0.2]], "attention weights must be non-negative, got -0.2"),
            ("topk_mass", "nan", [[math.nan, 1.0]], "attention rows must be finite, got 1 NaN or inf values"),
            (
                "effective_share",
                "row-sum-0.5",
                [[0.25, 0.25]],
                "attention rows must sum to 1 over the last dim, got a row summing to 0.5",
            ),
            ("max_weight", "negative", [[-1.0, 2.0]], "attention weights must be non-negative, got -1"),
            ("spearman", "nan", [[1.0, math.nan]], "scores must be finite, got 1 NaN or inf values"),
        )
    ],
    (
        "analyzer-deeper-than-the-model",
        lambda f: SelectivityAnalyzer(10, oracle=False).update(tiny_vit(), torch.zeros(1, 3, 32, 32)),
        UserError,
        lambda f: "SelectivityAnalyzer was built for 10 blocks but the model has 4; give depth=len(model.blocks)",
    ),
    (
        "analyzer-model-with-fewer-blocks",
        lambda f: SelectivityAnalyzer(4, oracle=False).update(tiny_vit(depth=2), torch.zeros(1, 3, 32, 32)),
        UserError,
        lambda f: "SelectivityAnalyzer was built for 4 blocks but the model has 2; give depth=len(model.blocks)",
    ),
    (
        "analyzer-unknown-scorer",
        lambda f: SelectivityAnalyzer(4, scorers=["l2_nrom"]),
        UserError,
        lambda f: f"SelectivityAnalyzer: unknown scorer 'l2_nrom' (known: {', '.join(sorted(SCORERS))})",
    ),
    *[
        (f"data-{name.replace('_', '-')}-{value}", lambda f, o={name: value}: _folder(f, **o), UserError, message)
        for name, value, message in (
            (
                "eval_batch_size",
                0,
                lambda f: "ImageFolderDataModule eval_batch_size must be an integer of at least 1, got 0",
            ),
            ("hflip", 5, lambda f: "ImageFolderDataModule hflip must be a number in [0, 1], got 5"),
            (
                "train_scale",
                (2, 1),
                lambda f: (
                    "ImageFolderDataModule train_scale must be (low, high) with 0 < low <= high <= 1 "
                    "(RandomResizedCrop's fractions of the image area), got (2, 1)"
                ),
            ),
        )
    ],
    ("folder-fewer-classes-than-the-head", lambda f: _folder(f).check_classes(10), UserError, _fewer_classes),
    (
        "folder-labels-beyond-the-head",
        lambda f: _folder(f, class_map=str(f["root"] / "labels-beyond.json")).for_model(
            load_model(f["tiny.safetensors"])
        ),
        UserError,
        _beyond_head,
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input(files, more_files, call, error, message):  # noqa: F811
    with pytest.raises(error) as info:
        call(files)
    assert str(info.value) == message(files)


NEW_HEAD = ("--model.init_args.backbone.num_classes", "10", "--model.init_args.backbone.new_head", "true")


def _class_map(f) -> tuple[str, str]:
    return "--data.init_args.class_map", str(f["root"] / "labels-beyond.json")


TRAINING_RANGES = {
    "mixup": "a number of at least 0",
    "cutmix": "a number of at least 0",
    "warmup_epochs": "a number of at least 0",
    "weight_decay": "a number of at least 0",
    "layer_decay": "a number in (0, 1]",
    "label_smoothing": "a number in [0, 1)",
    "lr": "a number of at least 0",
}


def _training_option(option: str, value: str):
    return lambda f: _train(f, f"--model.init_args.{option}", value)


def _training_range(option: str, value: str):
    return lambda f: f"PrunedClassifier {option} must be {TRAINING_RANGES[option]}, got {float(value)!r}"


SHIPPED = str(Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist_supervised.safetensors")


def _beyond(option: str, asked: int, data: ImageDataModule, split: str, available: int) -> str:
    data.prepare_splits()
    return f"{option} is {asked:,} but {data.describe_split(split)} holds {available:,}; give at most {available:,}"


CLI_CASES = [
    # (id, builder of (entry point, argv), the exact message after "error: ")
    (
        "evaluate-num-classes-replaces-head",
        lambda f: _evaluate(f, "--model.init_args.backbone.num_classes", "12"),
        _new_head,
    ),
    (
        "train-num-classes-replaces-head",
        lambda f: _train(f, "--model.init_args.backbone.num_classes", "5"),
        lambda f: _new_head(f, 5),
    ),
    (
        "evaluate-paradigm-mae-on-supervised",
        lambda f: _evaluate(f, "--model.init_args.backbone.paradigm", "mae"),
        _paradigm,
    ),
    (
        "train-paradigm-distilled-on-supervised",
        lambda f: _train(f, "--model.init_args.backbone.paradigm", "distilled"),
        lambda f: _paradigm(f, "distilled"),
    ),
    (
        "evaluate-folder-fewer-classes-than-a-new-head",
        lambda f: _evaluate(f, *NEW_HEAD),
        _fewer_classes,
    ),
    ("train-folder-fewer-classes-than-a-new-head", lambda f: _train(f, *NEW_HEAD), _fewer_classes),
    ("evaluate-labels-beyond-the-head", lambda f: _evaluate(f, *_class_map(f)), _beyond_head),
    ("train-labels-beyond-the-head", lambda f: _train(f, *_class_map(f)), _beyond_head),
    ("search-labels-beyond-the-head", lambda f: _search(f, "--budget", "0.5", *_class_map(f)), _beyond_head),
    ("analyze-labels-beyond-the-head", lambda f: _analyze(f, *_class_map(f)), _beyond_head),
    (
        "evaluate-routing-rules-twice",
        lambda f: _evaluate(f, "--routings", f"[{f['root'] / 'rules-twice.yaml'}]"),
        lambda f: (
            f"routing {str(f['root'] / 'rules-twice.yaml')!r} does not fit the model: "
            + _yaml(f, "rules-twice.yaml", "key 'rules' is given twice (lines 2 and 4)")
        ),
    ),
    (
        "train-config-key-twice",
        lambda f: _train(f, "--config", str(f["root"] / "trainer-twice.yaml")),
        lambda f: "Problems parsing config: trainer-twice.yaml: key 'trainer' is given twice (lines 1 and 5)",
    ),
    *[
        (f"train-{option.replace('_', '-')}-{value}", _training_option(option, value), _training_range(option, value))
        for option, value in (
            ("mixup", "-1"),
            ("cutmix", "-0.5"),
            ("warmup_epochs", "-1"),
            ("weight_decay", "-0.1"),
            ("layer_decay", "5"),
            ("label_smoothing", "1"),
            ("lr", "-0.001"),
        )
    ],
    (
        "train-depth-zero",
        lambda f: _train(f, "--model.init_args.backbone.model_kwargs", "{depth: 0}"),
        lambda f: (
            f"checkpoint {f['tiny.safetensors']}: vit_tiny_patch16_224 model_kwargs depth must be an integer "
            "of at least 1, got 0"
        ),
    ),
    (
        "quickstart-ratio-no-baseline-reaches",
        lambda f: ("quickstart", ["--model", SHIPPED, "--ratio", "0.01"]),
        lambda f: (
            "--ratio 0.01: not every routing comes within 2 points of 1% of the FLOPs (the closest: tome 21.4%, evit "
            "38.2%, topk_attention 37.2%, pitome 18.5%, layerwise 40.6%), so the table would compare them at "
            "different FLOPs; give a --ratio from 0.41 to 1"
        ),
    ),
    (
        "quickstart-test-images-beyond-the-data",
        lambda f: ("quickstart", ["--model", SHIPPED, "--test_images", "1000000"]),
        lambda f: _beyond("--test_images", 1_000_000, FashionMNISTDataModule(), "test", 10_000),
    ),
    (
        "search-val-images-beyond-the-data",
        lambda f: _search(f, "--budget", "0.5", "--val_images", "1000000"),
        lambda f: _beyond("--val_images", 1_000_000, _folder(f), "validation", 1),
    ),
    (
        "analyze-num-images-beyond-the-data",
        lambda f: _analyze(f, "--num_images", "1000000"),
        lambda f: _beyond("--num_images", 1_000_000, _folder(f), "validation", 1),
    ),
    (
        "analyze-token-map-images-beyond-the-batch",
        lambda f: _analyze(f, "--num_images", "1", "--token_map_images", "4"),
        lambda f: "--token_map_images is 4 but the first batch (of 64 images) holds 1; give at most 1",
    ),
    (
        "evaluate-routing-seed-2-to-the-70",
        lambda f: _evaluate(f, "--routings", f'["random:keep=0.5,seed={2**70}"]'),
        lambda f: (
            f"routing 'random:keep=0.5,seed={2**70}' does not fit the model: routing field 'seed' must be an integer "
            f"in [0, 4294967295], got {2**70}"
        ),
    ),
    (
        "evaluate-eval-batch-size-zero",
        lambda f: _evaluate(f, "--data.init_args.eval_batch_size", "0"),
        lambda f: "ImageFolderDataModule eval_batch_size must be an integer of at least 1, got 0",
    ),
    (
        "train-hflip-5",
        lambda f: _train(f, "--data.init_args.hflip", "5"),
        lambda f: "ImageFolderDataModule hflip must be a number in [0, 1], got 5.0",
    ),
    (
        "quickstart-logits-overflow",
        lambda f: ("quickstart", ["--model", str(f["root"] / "overflow10.safetensors"), "--test_images", "4"]),
        lambda f: (
            f"--model {f['root'] / 'overflow10.safetensors'}: the model's outputs on the first batch hold 40 "
            "non-finite values (NaN or inf) of 40; expected finite logits (check the weights, the input scaling and "
            "the precision)"
        ),
    ),
]


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_entry_point_refuses_bad_input_in_one_line(files, more_files, capsys, monkeypatch, build, message):  # noqa: F811
    monkeypatch.delenv("ATTNPRUNE_DEBUG", raising=False)
    name, argv = build(files)
    with pytest.raises(SystemExit) as info:
        run_cli(entry_point(name).main, argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {message(files)} (--debug or ATTNPRUNE_DEBUG=1 for a traceback)"]
    for out in OUTPUTS:
        assert not (files["root"] / out).exists(), out


def test_what_the_refusals_leave_valid(files, tmp_path):  # noqa: F811
    """A new head asked for by name, reading features without one, and the paradigm the checkpoint records."""
    network, spec = _checkpoint(files, num_classes=12, new_head=True).build()
    assert network.num_classes == 12 and spec["model_kwargs"]["num_classes"] == 12
    assert _checkpoint(files, num_classes=0).build()[0].num_classes == 0
    assert _checkpoint(files, num_classes=3, paradigm="supervised").build()[1]["paradigm"] == "supervised"
    network, spec = tiny_backbone(paradigm="mae").build()
    mae = save_model(network, tmp_path / "mae.safetensors", spec["architecture"], "mae", spec["model_kwargs"])
    assert Backbone(model="auto", checkpoint=str(mae)).build()[1]["paradigm"] == "mae"


def _nan_model():
    model = tiny_backbone().build()[0]
    with torch.no_grad():
        model.head.weight.fill_(math.nan)
    return model


SAVE_CASES = [
    # (id, the file name, save_model's arguments but the path, the exact message with {path} for the file)
    (
        "unknown-paradigm",
        "x.safetensors",
        {"paradigm": "clip"},
        "save_model {path}: unknown paradigm 'clip' (known: supervised, distilled, dino, mae)",
    ),
    (
        "paradigm-not-the-models",
        "x.safetensors",
        {"paradigm": "mae"},
        "save_model {path}: the model given does not fit architecture 'vit_tiny_patch16_224': missing "
        "['fc_norm.weight', 'fc_norm.bias'], unexpected ['norm.weight', 'norm.bias'], shape mismatch (checkpoint vs "
        "model) []",
    ),
    ("not-safetensors", "x.pth", {}, "save_model writes safetensors files: {path} must end in .safetensors"),
    (
        "non-finite-weights",
        "x.safetensors",
        {"model": _nan_model},
        "save_model {path}: the model given: weight 'head.weight' holds 96 non-finite values (NaN or inf); expected "
        "finite weights",
    ),
    (
        "metadata-not-json",
        "x.safetensors",
        {"card": {"trained": object}},
        "save_model {path}: its metadata must be JSON (model_kwargs and extra fields): Object of type type is not JSON "
        "serializable",
    ),
    (
        "not-a-timm-model",
        "x.safetensors",
        {"model": lambda: torch.nn.Linear(2, 2)},
        "save_model saves timm models (with a pretrained_cfg), got Linear",
    ),
]


@pytest.mark.parametrize(("name", "arguments", "message"), [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_save_model_refuses_what_load_model_would(tmp_path, name, arguments, message):
    """Each of these files, once written, was refused by load_model; now nothing is written."""
    arguments = dict(arguments)
    model = arguments.pop("model", lambda: tiny_backbone().build()[0])()
    path = tmp_path / name
    kwargs = {"architecture": TINY_BACKBONE["model"], "model_kwargs": TINY_BACKBONE["model_kwargs"], **arguments}
    with pytest.raises(UserError) as info:
        save_model(model, path, **kwargs)
    assert str(info.value) == message.format(path=path)
    assert list(tmp_path.iterdir()) == []
