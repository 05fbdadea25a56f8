"""benchmarks/search_generalization.py: the margins over the best baseline, of the routing returned and of the one
found before the held-out check, in test top-1 and test KL, with their paired standard errors, on hand-built rows;
DiffRate's rows taken over from an earlier run (``--reuse``); and benchmarks/check_policy.py's decision at each
confidence and its judged margins."""

import json
from pathlib import Path

import pytest
import torch

from attnprune.search.check import decide


@pytest.fixture
def benchmark():
    from benchmarks import search_generalization

    return search_generalization


@pytest.fixture
def margins(benchmark):
    return benchmark.margins


def _rows(seed: int, searched: float, found: float | None, tome: float, evit: float) -> list[dict]:
    cell = {"model": "m", "budget": 0.5, "split_seed": seed}
    row = {**cell, "method": "searched", "top1": searched}
    if found is not None:
        row["found_top1"] = found
    return [row, {**cell, "method": "tome", "top1": tome}, {**cell, "method": "evit", "top1": evit}]


def test_margins_of_the_returned_and_of_the_found_routing(margins):
    # seed 0: the check returned ToMe (0.80) although the search had found 0.81; seed 1: it kept a 0.83 routing
    result = {"rows": _rows(0, 0.80, 0.81, 0.80, 0.70) + _rows(1, 0.83, 0.83, 0.80, 0.82)}
    assert margins(result)[("m", 0.5)] == pytest.approx([0.0, 1.0])
    assert margins(result, before_check=True)[("m", 0.5)] == pytest.approx([1.0, 1.0])
    older = {"rows": _rows(0, 0.80, None, 0.79, 0.70)}  # a row written before found_top1 existed
    assert margins(older)[("m", 0.5)] == pytest.approx([1.0]) and margins(older, before_check=True) == {}


def test_test_kl_margins_take_the_lowest_baseline(margins):
    cell = {"model": "m", "budget": 0.6, "split_seed": 0}
    rows = [
        {**cell, "method": "searched", "top1": 0.8, "test_kl": 0.050, "found_top1": 0.81, "found_test_kl": 0.020},
        {**cell, "method": "tome", "top1": 0.8, "test_kl": 0.050},
        {**cell, "method": "random", "top1": 0.7, "test_kl": 0.030},
    ]
    # the routing found (0.020) against the closest baseline, random (0.030): -10 in 10^-3 nats
    assert margins({"rows": rows}, before_check=True, metric="test_kl")[("m", 0.6)] == pytest.approx([-10.0])
    assert margins({"rows": rows}, metric="test_kl")[("m", 0.6)] == pytest.approx([20.0])  # the returned ToMe


def test_resolution_pairs_each_margin_with_its_paired_error_against_the_best_baseline(benchmark):
    def draw(seed: int, returned: str, top1: float, se: dict, found_se: dict) -> list[dict]:
        cell = {"model": "m", "budget": 0.5, "split_seed": seed}
        searched = {**cell, "method": "searched", "top1": top1, "found_top1": 0.85, "returned": returned}
        searched |= {"paired_se": se, "found_paired_se": found_se}
        return [searched, {**cell, "method": "tome", "top1": 0.84}, {**cell, "method": "evit", "top1": 0.82}]

    rows = draw(0, "searched", 0.85, {"tome": 0.0015, "evit": 0.003}, {"tome": 0.0015, "evit": 0.003})
    rows += draw(1, "tome", 0.84, {"tome": 0.0, "evit": 0.002}, {"tome": 0.002, "evit": 0.004})
    # ToMe is the best baseline; seed 1 returned it, so only seed 0 has a returned routing's margin to resolve
    ((margin, error),) = benchmark.resolution({"rows": rows})[("m", 0.5)]
    assert (margin, error) == (pytest.approx(1.0), pytest.approx(0.15))
    found = benchmark.resolution({"rows": rows}, before_check=True)[("m", 0.5)]
    assert [pytest.approx(pair) for pair in found] == [(1.0, 0.15), (1.0, 0.2)]


def test_reuse_takes_diffrate_rows_and_their_paired_errors_only_for_the_routing_scored_then(benchmark, tmp_path: Path):
    cell = {"model": "m", "budget": 0.6, "split_seed": 1}
    searched = {**cell, "method": "searched", "found_top1": 0.75, "found_test_kl": 0.02, "found_paired_se": {}}
    diffrate = {**cell, "method": "diffrate", "top1": 0.74}
    lone = {**cell, "split_seed": 2, "method": "searched", "found_top1": 0.7, "found_test_kl": 0.03}
    earlier = {"rows": [searched, diffrate, {**cell, "method": "tome", "top1": 0.73}, lone]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    reusable = benchmark._reusable(path)
    assert reusable == {("m", 0.6, 1): {"searched": searched, "diffrate": diffrate}}  # seed 2 has no DiffRate row
    same = {"top1": torch.tensor([1.0, 1.0, 1.0, 0.0]), "kl": torch.tensor([0.02, 0.02, 0.02, 0.02])}
    assert benchmark._same_found(reusable[("m", 0.6, 1)], same)  # the same routing: its paired errors hold
    assert not benchmark._same_found(reusable[("m", 0.6, 1)], {**same, "top1": torch.tensor([1.0, 1.0, 0.0, 0.0])})
    assert not benchmark._same_found(reusable[("m", 0.6, 1)], {**same, "kl": same["kl"] + 1e-6})
    assert not benchmark._same_found({}, same)


def test_a_paired_error_left_out_by_reuse_counts_as_done_and_is_reported_missing(benchmark, capsys):
    """A searched row whose paired error against DiffRate could not be taken over (``paired_se_missing``) is a done
    cell, and the summary pairs its margin with no error where DiffRate is the best baseline."""
    cell = {"model": "m", "budget": 0.6, "split_seed": 0}
    searched = {**cell, "method": "searched", "top1": 0.80, "found_top1": 0.80, "returned": "searched"}
    searched |= {"paired_se": {"tome": 0.002}, "found_paired_se": {"tome": 0.002, "evit": 0.004, "pitome": 0.003}}
    searched["paired_se_missing"] = ["found_paired_se.diffrate", "paired_se.diffrate"]
    assert benchmark._complete(searched, {"pitome", "diffrate"})
    assert not benchmark._complete({**searched, "paired_se_missing": []}, {"pitome", "diffrate"})
    rows = [searched, {**cell, "method": "tome", "top1": 0.79}, {**cell, "method": "diffrate", "top1": 0.81}]
    assert benchmark.resolution({"rows": rows})[("m", 0.6)] == [(pytest.approx(-1.0), None)]
    benchmark._print_resolution({"rows": rows}, before_check=False)
    assert "m at 60%, mean -1.00: -1.00 ± n/a" in capsys.readouterr().out


def test_check_policy_recomputes_the_decision_at_each_confidence_from_the_paired_differences(capsys):
    from benchmarks import check_policy

    # against ToMe the routing found is 0.002 lower with standard error 0.0015: z = 1.33 keeps it below 0 (at 0.9,
    # z = 1.28), not z = 1.64 (0.95), where the baseline with the lowest held-out loss (tome, not pitome) is returned
    check = {
        "paired": {
            "tome": {"difference": -0.002, "standard_error": 0.0015},
            "pitome": {"difference": -0.05, "standard_error": 0.01},
        },
        "holdout": {"searched": {"loss": 0.018}, "tome": {"loss": 0.020}, "pitome": {"loss": 0.068}},
    }
    losses = {method: values["loss"] for method, values in check["holdout"].items()}
    assert [decide(check["paired"], losses, c) for c in (0.5, 0.9, 0.95)] == ["searched", "searched", "tome"]
    row = {
        "model": "m",
        "budget": 0.6,
        "returned": {"0.5": "searched", "0.95": "tome"},
        "judged": {
            "searched": {"top1": 0.81, "kl": 0.010},
            "tome": {"top1": 0.80, "kl": 0.015},
            "pitome": {"top1": 0.78, "kl": 0.030},
        },
    }
    check_policy.summarize({"rows": [row]}, [0.5, 0.95])
    lines = capsys.readouterr().out.splitlines()
    # judged against the best baseline (tome): +1.00 point and -5 10^-3 nats when the routing found is returned
    assert lines[-5].split() == ["0.5", "+1.00", "/", "-5.00", "(1/1)"]
    assert lines[-4].split() == ["0.95", "+0.00", "/", "+0.00", "(0/1)"]
    assert lines[-3].split() == ["found", "+1.00", "/", "-5.00", "(1/1)"]
    assert lines[-2] == "at 0.5 a baseline was returned in 0 of 1 searches; the routing found was closer to the " + (
        "unpruned model in 0 of them and more accurate in 0"
    )
    assert lines[-1].startswith("at 0.95 a baseline was returned in 1 of 1 searches; the routing found was closer")
    assert lines[-1].endswith("in 1 of them and more accurate in 1")


def test_merge_keeps_one_row_per_draw_and_method_the_first_files(benchmark, tmp_path: Path):
    def write(name: str, top1: float) -> Path:
        path = tmp_path / name
        rows = [{"model": "m", "budget": 0.5, "split_seed": 0, "method": "tome", "top1": top1}]
        path.write_text(json.dumps({"rows": rows, "models": {"m": {}}}))
        return path

    out = tmp_path / "out.json"
    benchmark.merge(out, [write("a.json", 0.8), write("b.json", 0.7)])
    assert [row["top1"] for row in json.loads(out.read_text())["rows"]] == [0.8]
