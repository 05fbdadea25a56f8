"""Bad input that used to pass silently (a wrong answer that looks right), table-driven beside
``tests/test_bad_input.py`` and reusing its files: each case asserts the exact one-line message, and that nothing was
written."""

from __future__ import annotations

import pytest

from attnprune import save_model
from attnprune.cli import run_cli
from attnprune.errors import UserError
from attnprune.lit.backbone import Backbone
from tests.conftest import tiny_backbone
from tests.test_bad_input import _evaluate, _train, entry_point, files  # noqa: F401 (files: the fixture)

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


API_CASES = [
    # (id, call, exception, the exact message)
    ("backbone-num-classes-replaces-head", lambda f: _checkpoint(f, num_classes=12).build(), UserError, _new_head),
    ("backbone-paradigm-not-the-checkpoints", lambda f: _checkpoint(f, paradigm="mae").build(), UserError, _paradigm),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input(files, call, error, message):  # noqa: F811
    with pytest.raises(error) as info:
        call(files)
    assert str(info.value) == message(files)


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
]


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_entry_point_refuses_bad_input_in_one_line(files, capsys, monkeypatch, build, message):  # noqa: F811
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
