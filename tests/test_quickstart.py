"""The quickstart: which tables it prints by default, and the line that says what its searched row is."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from attnprune import Routing
from attnprune.cli import quickstart

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_the_two_shipped_tables_and_model_or_ratio_is_one():
    assert quickstart.parse_args([]).default_cases
    assert [(path.stem, ratio) for path, ratio, _ in quickstart.CASES] == [
        ("fmnist_supervised", 0.6),
        ("fmnist_mae", 0.5),
    ]
    one = quickstart.parse_args(["--ratio", "0.5"])
    assert not one.default_cases and (one.model, one.ratio) == (str(quickstart.SHIPPED), 0.5)
    other = quickstart.parse_args(["--model", "random-deit-s"])
    assert not other.default_cases and other.ratio == 0.6


def test_verdict_names_a_returned_baseline_or_the_margin_of_the_routing_found():
    top1 = {"unpruned": 0.9, "tome": 0.864, "pitome": 0.8652, "searched": 0.8815}
    found = dataclasses.replace(Routing.tome(2, 4), name="searched")
    assert quickstart._verdict(found, top1) == (
        "the routing the search found, +1.63 points against the best baseline shown (pitome)"
    )
    returned = Routing.tome(2, 4)  # named "tome-r2": a baseline the held-out check returned
    assert quickstart._verdict(returned, {**top1, "searched": 0.8642}).startswith(
        f"the held-out check returned {returned.name}'s own schedule"
    )


def test_one_shipped_model_prints_its_table_with_the_searched_routing(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the searched routings are looked up relative to the repository root
    if not Path("checkpoints/fmnist_mae.safetensors").is_file():
        pytest.skip("the shipped MAE checkpoint is not in this checkout")
    quickstart.main(
        ["--model", "checkpoints/fmnist_mae.safetensors", "--ratio", "0.5", "--test_images", "500", "--repeats", "1"]
    )
    out = capsys.readouterr().out
    rows = [
        line.split()[0]
        for line in out.splitlines()
        if line.split()
        and line.split()[0] in ("unpruned", "tome", "evit", "topk_attention", "pitome", "layerwise", "searched")
    ]
    assert rows == ["unpruned", "tome", "evit", "topk_attention", "pitome", "layerwise", "searched"]
    assert "fmnist_mae at 50% of the FLOPs, test split (500 images)" in out
    assert "fmnist_mae-0.5.yaml (benchmarks/pareto.py, validation images): the routing the search found" in out
