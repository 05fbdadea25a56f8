"""benchmarks/search_generalization.py: the margins over the best baseline, of the routing returned and of the one
found before the held-out check, on hand-built rows."""

from pathlib import Path

import pytest


@pytest.fixture
def margins(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))  # it imports its sibling pareto.py
    from search_generalization import margins

    return margins


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
