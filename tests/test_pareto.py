"""benchmarks/pareto.py: the held-out checks of a run retaken at a lower confidence, on hand-built results (the last
one on the shipped supervised model, its baselines tuned again and scored)."""

import json

import pytest

from attnprune import Routing, count_flops, load_model
from benchmarks import pareto
from tests.conftest import ROOT

SHIPPED = str(ROOT / "checkpoints" / "fmnist_supervised.safetensors")


def _result(returned: str) -> dict:
    # the routing found is 0.001 lower in held-out KL than ToMe, standard error 0.001: kept at z = 0 (0.5), not at
    # z = 1.645 (0.95), where ToMe is returned
    check = {
        "confidence": 0.95,
        "returned": returned,
        "holdout": {"searched": {"loss": 0.019}, "tome": {"loss": 0.020}},
        "paired": {"tome": {"difference": -0.001, "standard_error": 0.001}},
        "searched_routing": {"name": "searched", "rules": []},
    }
    searched = {"method": "searched", "budget": 0.6, "top1": 0.80, "flops_ratio": 0.59, "gflops": 0.59}
    searched |= {"routing": {"name": "tome"}, "search": {"check": check}}
    if returned != "searched":
        searched["unchecked"] = {"top1": 0.81, "flops_ratio": 0.6}
    tome = {"method": "tome", "budget": 0.6, "top1": 0.80, "flops_ratio": 0.6, "gflops": 0.6}
    return {"model": "m", "unpruned": {"gflops": 1.0, "top1": 0.9}, "results": [searched, tome]}


def test_a_lower_confidence_returns_the_routing_found_with_its_measured_top1():
    result = _result("tome")
    again = pareto.at_confidence(result, 0.5)
    row = again["results"][0]
    assert (row["top1"], row["flops_ratio"], row["gflops"]) == (0.81, 0.6, pytest.approx(0.6))
    assert row["search"]["check"]["returned"] == "searched" and row["routing"] == {"name": "searched", "rules": []}
    assert "unchecked" not in row and pareto.beats_all({r["method"]: r for r in again["results"]})
    assert result["results"][0]["top1"] == 0.80  # the run's own result is left as it was
    assert pareto.at_confidence(result, 0.95)["results"][0]["top1"] == 0.80  # the same confidence: the same answer


def test_a_decision_that_would_need_an_unmeasured_baseline_is_refused():
    with pytest.raises(ValueError, match="^--recheck 0.99: the check of m at 0.6, run at 0.95, would return tome, "):
        pareto.at_confidence(_result("searched"), 0.99)


def test_recheck_tunes_the_baselines_again_and_writes_the_routing_whose_decision_changed(tmp_path, capsys):
    """The shipped supervised model, its routing found ToMe with r=4: after the recheck every baseline is tuned to
    its FLOPs (within 1%) and scored on the run's 200 test images, and the routing is written beside."""
    model = load_model(SHIPPED)
    found = Routing.parse("tome:r=4", len(model.blocks))
    result = _result("tome")
    result |= {"model": "fmnist_supervised", "checkpoint": SHIPPED, "val_images": 300, "test_images": 200}
    result["results"][0]["search"]["check"]["searched_routing"] = found.to_dict()
    result["results"][0]["unchecked"]["flops_ratio"] = count_flops(model, found) / count_flops(model)
    for method in ("evit", "topk_attention", "pitome", "ppt", "random"):  # the run's rows, replaced by the recheck
        result["results"].append({"method": method, "budget": 0.6, "top1": 0.0, "flops_ratio": 0.0, "gflops": 0.0})
    path, routings = tmp_path / "pareto_fmnist_supervised.json", tmp_path / "routings"
    path.write_text(json.dumps(result))
    argv = ["--summarize", str(path), "--recheck", "0.5", "--routing_dir", str(routings), "--out_dir", str(tmp_path)]
    pareto.main(argv)
    rows = {row["method"]: row for row in json.loads(path.read_text())["results"]}
    assert rows["searched"]["top1"] == 0.81 and rows["searched"]["search"]["check"]["returned"] == "searched"
    assert set(rows) == {"searched", "tome", "evit", "topk_attention", "pitome", "ppt", "random"}
    for method, row in rows.items():
        assert abs(row["flops_ratio"] / rows["searched"]["flops_ratio"] - 1) < 0.01, method
        if method != "searched":  # scored again, on the 200 test images: a multiple of 1/200
            assert round(row["top1"] * 200, 6) == int(round(row["top1"] * 200)) and row["top1"] > 0.5
    assert Routing.from_yaml(routings / "fmnist_supervised-0.6.yaml") == found
    assert (tmp_path / "pareto_fmnist_supervised.png").is_file() and (tmp_path / "pareto_all.png").is_file()
    assert "fmnist_supervised at 0.6: now the routing found, 81.00%" in capsys.readouterr().out
