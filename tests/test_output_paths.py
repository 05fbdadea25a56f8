"""Where the entry points write: file names made from routing names stay inside the output folder, search.py refuses
outputs it could not write, or that are the same file, before any work, and train.py without a logger leaves the
working directory's ``checkpoints/`` (the shipped models, at the repository's top) alone. Real tiny models, files
and runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attnprune import Routing, save_model
from attnprune.atomic import check_output_dir, check_output_file, safe_file_names
from attnprune.cli import analyze, evaluate, run_cli, search, train
from attnprune.lit.data import ImageFolderDataModule
from attnprune.lit.modules import PrunedClassifier
from tests.conftest import TINY_BACKBONE, make_image_folder, tiny_backbone

HINT = " (--debug or ATTNPRUNE_DEBUG=1 for a traceback)"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model's weights and an image folder, outside the folders the tests watch."""
    root = tmp_path_factory.mktemp("inputs")
    model = PrunedClassifier(tiny_backbone()).model
    kwargs = TINY_BACKBONE["model_kwargs"]
    weights = save_model(model, root / "tiny.safetensors", TINY_BACKBONE["model"], model_kwargs=kwargs)
    return {"model": weights, "images": make_image_folder(root / "images"), "cache": root / "hf"}


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path to content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ names from user data
@pytest.mark.parametrize(
    "name,safe",
    [
        ("tome-r2", "tome-r2"),
        ("evit-0.7", "evit-0.7"),
        ("x/../../evil", "x_.._.._evil"),
        ("../../../evil", "_._.._.._evil"),
        ("/tmp/evil", "_tmp_evil"),
        ("..", "_."),
        (".hidden", "_hidden"),
        ("a\\b:c d", "a_b_c_d"),
        ("", "_"),
        ("n" * 300, "n" * 100),
    ],
)
def test_safe_file_names_stay_in_the_folder(tmp_path, name, safe):
    (got,) = safe_file_names([name])
    assert got == safe
    assert (tmp_path / f"tokens_{got}.png").resolve().parent == tmp_path.resolve()


def test_safe_file_names_are_unique():
    assert safe_file_names(["a/b", "a_b", "a/b", "a_b-2"]) == ["a_b", "a_b-2", "a_b-3", "a_b-2-2"]


def test_analyze_writes_token_maps_of_hostile_routing_names_inside_output_dir(inputs, tmp_path):
    out = tmp_path / "work" / "a" / "b" / "report"
    names = ["x/../../evil", "../../../evil", "/abs/evil", "..", "tome-r2"]
    specs = []
    for i, name in enumerate(names):
        path = tmp_path / f"r{i}.yaml"
        Routing.from_dict({"name": name, "rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5}]}).to_yaml(path)
        specs.append(str(path))
    data = ImageFolderDataModule(root=str(inputs["images"]), batch_size=4, val_size=6, cache_dir=str(inputs["cache"]))
    before = files_under(tmp_path)
    analyze.analyze(str(inputs["model"]), data, output_dir=str(out), num_images=2, oracle=False, routings=specs)
    stems = ["x_.._.._evil", "_._.._.._evil", "_abs_evil", "_.", "tome-r2"]
    tables = {"selectivity.json", "selectivity.csv", "selectivity.png", "selectivity.pdf"}
    assert {p.name for p in out.iterdir()} == tables | {f"tokens_{s}.{ext}" for s in stems for ext in ("png", "pdf")}
    assert all(p.is_file() for p in out.iterdir())  # no folder made from a name
    after = files_under(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("work/a/b/report/")} == before  # nothing else written


# ---------------------------------------------------------------------------------- search.py's outputs
def _data(inputs) -> list[str]:
    root, cache = str(inputs["images"]), str(inputs["cache"])
    data = ["--data.class_path", "attnprune.lit.data.ImageFolderDataModule", "--data.init_args.root", root]
    return [*data, "--data.init_args.cache_dir", cache]


def _search(inputs, output: Path, *extra: str) -> list[str]:
    data = _data(inputs)
    options = ["--budget", "0.6", "--val_images", "6", "--output", str(output)]
    return ["--model", str(inputs["model"]), *data, *options, *extra]


def _refused(capsys, monkeypatch, argv: list[str], main=search.main) -> str:
    """The one stderr line of a command refused with exit status 2; it read no image (its first line says so)."""
    monkeypatch.delenv("ATTNPRUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert not any(word in captured.out for word in ("searching on", "analysing", "evaluating on")), captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.endswith(HINT)
    return line.removeprefix("error: ").removesuffix(HINT)


def _cases(tmp: Path) -> list[tuple[str, Path, list[str], str]]:
    """(id, --output, further options, the message), with what each case needs made under ``tmp``."""
    (tmp / "a-folder").mkdir()
    (tmp / "a-file").write_text("not a folder")
    (tmp / "state.json").write_text('{"from": "an earlier search"}')
    (tmp / "report-folder.json").mkdir()
    r_json, r_yaml = tmp / "r.json", tmp / "r.yaml"
    report = "--output's report (its name with .json)"
    return [
        (
            "output-is-its-report",
            r_json,
            [],
            f"--output and {report} are the same file {r_json}; give each its own path",
        ),
        (
            "output-is-the-state",
            r_yaml,
            ["--state_path", str(r_yaml)],
            f"--output and --state_path are the same file {r_yaml}; give each its own path",
        ),
        (
            "report-is-the-state",
            tmp / "state.yaml",
            ["--state_path", str(tmp / "state.json")],
            f"{report} and --state_path are the same file {tmp / 'state.json'}; give each its own path",
        ),
        (
            "output-is-a-directory",
            tmp / "a-folder",
            [],
            f"--output {tmp / 'a-folder'} is a directory; expected a file name",
        ),
        (
            "report-is-a-directory",
            tmp / "report-folder.yaml",
            [],
            f"--output's report {tmp / 'report-folder.json'} is a directory; expected a file name",
        ),
        (
            "output-under-a-file",
            tmp / "a-file" / "sub" / "r.yaml",
            [],
            f"--output {tmp / 'a-file' / 'sub' / 'r.yaml'} cannot be written: {tmp / 'a-file'} is not a directory",
        ),
        (
            "state-is-a-directory",
            r_yaml,
            ["--state_path", str(tmp / "a-folder")],
            f"--state_path {tmp / 'a-folder'} is a directory; expected a file name",
        ),
    ]


CASE_IDS = [
    "output-is-its-report",
    "output-is-the-state",
    "report-is-the-state",
    "output-is-a-directory",
    "report-is-a-directory",
    "output-under-a-file",
    "state-is-a-directory",
]


@pytest.mark.parametrize("case", CASE_IDS)
def test_search_refuses_an_output_before_the_search(inputs, tmp_path, capsys, monkeypatch, case):
    cases = {c[0]: c[1:] for c in _cases(tmp_path)}
    assert set(cases) == set(CASE_IDS)
    output, extra, message = cases[case]
    before = files_under(tmp_path)
    assert _refused(capsys, monkeypatch, _search(inputs, output, *extra)) == message
    assert files_under(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "report-folder.json", "state.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_search_refuses_an_unwritable_folder(inputs, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    message = _refused(capsys, monkeypatch, _search(inputs, locked / "new" / "r.yaml"))
    assert message == f"--output {locked / 'new' / 'r.yaml'} cannot be written: the folder {locked} is not writable"
    assert not any(locked.iterdir())


def test_output_checks_accept_folders_still_to_be_made(tmp_path):
    path = tmp_path / "runs" / "search" / "r.yaml"
    assert check_output_file(path, "--output") == path
    assert check_output_file(str(tmp_path / "old.yaml"), "--output") == tmp_path / "old.yaml"
    assert check_output_dir(tmp_path / "results" / "a", "--output_dir") == tmp_path / "results" / "a"
    assert check_output_dir(tmp_path, "--output_dir") == tmp_path
    assert not any(tmp_path.iterdir())  # a check, nothing made


# ------------------------------------------------------------------------- analyze.py's and evaluate.py's folders
def _analyze(inputs, output_dir: Path) -> list[str]:
    data = _data(inputs)
    return ["--model", str(inputs["model"]), *data, "--num_images", "2", "--output_dir", str(output_dir)]


def _evaluate(inputs, output_dir: Path, root: Path) -> list[str]:
    module = ["--model.class_path", "attnprune.lit.modules.PrunedClassifier", "--model.init_args.backbone.model"]
    module += ["auto", "--model.init_args.backbone.checkpoint", str(inputs["model"])]
    data = _data(inputs)
    trainer = ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root)]
    return [*module, *data, *trainer, "--throughput_repeats", "0", "--output_dir", str(output_dir)]


@pytest.mark.parametrize("command", ["analyze", "evaluate"])
@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_output_dir_that_is_no_folder_is_refused_up_front(inputs, tmp_path, capsys, monkeypatch, command, where):
    (tmp_path / "a-file").write_text("not a folder")
    output_dir = tmp_path / "a-file" / ("sub" if where == "under-a-file" else "")
    if where == "a-file":
        message = f"--output_dir {output_dir} is a file; expected a folder"
    else:
        message = f"--output_dir {output_dir} cannot be written: {tmp_path / 'a-file'} is not a directory"
    if command == "analyze":
        argv, main = _analyze(inputs, output_dir), analyze.main
    else:
        argv, main = _evaluate(inputs, output_dir, tmp_path / "run"), evaluate.main
    assert _refused(capsys, monkeypatch, argv, main) == message
    assert files_under(tmp_path) == {"a-file": b"not a folder"}
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


# --------------------------------------------------------------------------------- train.py without a logger
def test_train_without_a_logger_leaves_the_shipped_checkpoints_alone(inputs, tmp_path, monkeypatch):
    shipped = tmp_path / "checkpoints"
    shipped.mkdir()
    (shipped / "fmnist_supervised.safetensors").write_bytes(b"shipped weights")
    monkeypatch.chdir(tmp_path)  # as if run from the repository's top
    argv = [
        "fit",
        "--model.class_path",
        "attnprune.lit.modules.PrunedClassifier",
        "--model.init_args.backbone.model",
        "auto",
        "--model.init_args.backbone.checkpoint",
        str(inputs["model"]),
        *_data(inputs),
        "--data.init_args.batch_size",
        "4",
        "--trainer.logger",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    run_cli(train.main, argv)
    assert files_under(shipped) == {"fmnist_supervised.safetensors": b"shipped weights"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "runs"]
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "runs" / "lightning_config.yaml").is_file()
