"""benchmarks/pareto.py: the held-out checks of a run retaken at a lower confidence, on a hand-built result."""

import pytest

from benchmarks import pareto


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
    with pytest.raises(ValueError, match="^--confidence 0.99: the check of m at 0.6, run at 0.95, would return tome, "):
        pareto.at_confidence(_result("searched"), 0.99)


def test_rewrite_writes_the_results_and_the_routing_whose_decision_changed(tmp_path, capsys):
    import json

    path, routings = tmp_path / "pareto_m.json", tmp_path / "routings"
    path.write_text(json.dumps(_result("tome")))
    pareto.main(
        [
            "--summarize",
            str(path),
            "--confidence",
            "0.5",
            "--rewrite",
            "--routing_dir",
            str(routings),
            "--out_dir",
            str(tmp_path),
        ]
    )
    row = json.loads(path.read_text())["results"][0]
    assert row["top1"] == 0.81 and row["search"]["check"] == {**_result("tome")["results"][0]["search"]["check"]} | {
        "returned": "searched",
        "confidence": 0.5,
    }
    assert (routings / "m-0.6.yaml").read_text().startswith("name: searched")
    assert "m at 0.6: now the routing found, 81.00%" in capsys.readouterr().out
