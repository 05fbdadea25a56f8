"""Budgeted routing search on a tiny ViT: budgets respected, caching exact, resumable, clear errors."""

from __future__ import annotations

import copy
import random
from functools import partial

import pytest
import torch

import attnprune.search as search_module
from attnprune import Routing, count_flops, prune, unprune
from attnprune.flops import matched_baselines
from attnprune.search import InfeasibleBudget, SearchSpace, _Evaluator, search_routing
from tests.conftest import tiny_vit

SMALL = SearchSpace(
    scorers=("l2_norm", "cls_attention"),
    reducers=("drop", "fuse", "merge"),
    keeps=(0.7,),
    merge_keeps=(0.8,),
    layers=(0, 1, 2),
)


@pytest.fixture(scope="module")
def model():
    return tiny_vit(num_classes=4)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(2)]


def test_budget_is_respected(model, data):
    unpruned = count_flops(model, Routing())
    rng = random.Random(0)
    for budget in [rng.uniform(0.45, 0.95) for _ in range(4)]:
        for strategy in ("beam", "transition"):
            result = search_routing(model, data, budget, space=SMALL, strategy=strategy, progress=False)
            assert count_flops(model, result.routing) <= budget * unpruned
            assert result.report["flops_ratio"] <= budget and 0.0 <= result.report["val_top1"] <= 1.0
            assert result.report["candidates_evaluated"] > 1 and result.report["images"] == 24


def test_beam_spends_the_budget_left_without_losing_accuracy(model, data):
    evaluator, space = _Evaluator(model, data), SearchSpace(keeps=(0.5, 0.7, 0.9))
    harsh = Routing.from_dict({"rules": [{"layer": 0, "score": "l2_norm", "keep": 0.5, "reduce": "drop"}]})
    target = 0.99 * count_flops(model, Routing())  # removing the rule would cost 100%: keep 0.9 is the mildest

    def fill(top1: float) -> Routing:
        state = {"best": {"routing": harsh.to_dict(), "top1": top1}}
        search_module._fill_budget(model, evaluator, space, target, state)
        assert state["best"]["top1"] >= top1 and state["before_fill"]["val_top1"] == top1
        return Routing.from_dict(state["best"]["routing"])

    assert fill(top1=1.0) == harsh  # no milder routing can match a perfect score: nothing changes
    filled = fill(top1=0.0)  # the first move cannot lose top-1; later ones only while top-1 does not fall
    assert filled.rules[0].keep in (0.7, 0.9) and count_flops(model, harsh) < count_flops(model, filled) <= target
    if filled.rules[0].keep == 0.7:
        mildest = Routing.from_dict({"rules": [{**filled.rules[0].to_dict(), "keep": 0.9}]})
        accuracy = partial(evaluator.accuracy, evaluator.initial(), start=0)
        assert accuracy(mildest) < accuracy(filled)
    result = search_routing(model, data, 0.9, space=SMALL, progress=False)
    before = result.report["before_fill"]
    assert result.report["flops_ratio"] >= before["flops_ratio"] and result.report["val_top1"] >= before["val_top1"]


def test_prefix_caching_gives_the_same_accuracy(model, data):
    evaluator = _Evaluator(model, data)
    routing = Routing.from_dict(
        {
            "rules": [
                {"layer": 0, "score": "l2_norm", "keep": 0.7},
                {"layer": 2, "r": 6, "reduce": "merge"},
                {"layer": 3, "score": "cls_attention", "keep": 0.5, "reduce": "fuse"},
            ]
        }
    )
    prefix = Routing.from_dict({"rules": [{"layer": 0, "score": "l2_norm", "keep": 0.7}]})
    cached = evaluator.advance(evaluator.initial(), prefix, 0, 2)
    assert evaluator.accuracy(cached, routing, 2) == evaluator.accuracy(evaluator.initial(), routing, 0)
    pruned = prune(tiny_vit(num_classes=4), routing)
    with torch.no_grad():
        direct = sum((pruned(x).argmax(-1) == y).sum().item() for x, y in data) / 24
    assert evaluator.accuracy(evaluator.initial(), routing, 0) == direct
    cached_search = search_routing(model, data, 0.7, space=SMALL, progress=False)
    uncached_search = search_routing(model, data, 0.7, space=SMALL, prefix_cache=False, progress=False)
    assert cached_search.routing == uncached_search.routing
    assert cached_search.report["val_top1"] == uncached_search.report["val_top1"]
    assert cached_search.report["block_passes"] < uncached_search.report["block_passes"]


def test_killed_search_resumes_to_the_same_result(model, data, tmp_path, monkeypatch):
    full = search_routing(model, data, 0.7, space=SMALL, progress=False)
    state = tmp_path / "state.json"
    calls = {"n": 0}
    original = search_module._checkpoint

    def dies_after_two_steps(*args):
        original(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "_checkpoint", dies_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        search_routing(model, data, 0.7, space=SMALL, state_path=state, progress=False)
    monkeypatch.setattr(search_module, "_checkpoint", original)
    assert '"step": 2' in state.read_text()
    resumed = search_routing(model, data, 0.7, space=SMALL, state_path=state, progress=False)
    assert resumed.routing == full.routing and resumed.report["val_top1"] == full.report["val_top1"]
    assert resumed.report["candidates_evaluated"] == full.report["candidates_evaluated"]
    with pytest.raises(ValueError, match="belongs to another search"):
        search_routing(model, data, 0.6, space=SMALL, state_path=state, progress=False)
    retrained_head = copy.deepcopy(model)  # same backbone, another classifier: the saved state no longer applies
    with torch.no_grad():
        retrained_head.head.bias[0] += 1.0
    with pytest.raises(ValueError, match="belongs to another search"):
        search_routing(retrained_head, data, 0.7, space=SMALL, state_path=state, progress=False)
    relabelled = [(images, (labels + 1) % 4) for images, labels in data]  # same images, other labels
    with pytest.raises(ValueError, match="belongs to another search"):
        search_routing(model, relabelled, 0.7, space=SMALL, state_path=state, progress=False)


def test_infeasible_budget_names_the_cheapest_flops(model, data):
    with pytest.raises(
        InfeasibleBudget,
        match=r"budget 0.05 .* cheapest routing the search space reaches: "
        r"[0-9.]+ GFLOPs \([0-9.]+% of the unpruned model\)",
    ):
        search_routing(model, data, 0.05, space=SMALL, progress=False)


def test_label_free_picks_a_transition_routing(model, data):
    result = search_routing(model, data, 0.7, space=SMALL, strategy="label_free", progress=False)
    assert result.routing.name.startswith("transition-t")
    assert result.report["candidates_evaluated"] == 1
    with pytest.raises(ValueError, match="unknown search strategy 'greedy'"):
        search_routing(model, data, 0.7, strategy="greedy")


def test_holdout_check_returns_the_baseline_that_does_better_on_held_out_images(model):
    """Labels are ToMe's own predictions, so ToMe scores 100% on the held-out half: the searched routing survives
    the check only by matching that."""
    budget = 0.6
    tome = matched_baselines(model, budget * count_flops(model, Routing()), within=True)["tome"]
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(12, 3, 32, 32, generator=g) for _ in range(4)]
    with torch.no_grad():
        prune(model, tome)
        data = [(x, model(x).argmax(-1)) for x in images]
        unprune(model)
    result = search_routing(model, data, budget, space=SMALL, holdout=0.5, progress=False)
    check = result.report["check"]
    assert result.report["images"] == 24 and check["holdout_images"] == 24
    assert set(check["holdout_top1"]) == {"searched", "tome", "evit", "topk_attention"}
    assert check["holdout_top1"]["tome"] == 1.0 > check["holdout_top1"]["searched"] and check["returned"] == "tome"
    assert result.routing == tome and result.report["val_top1"] == 1.0
    found = Routing.from_dict(check["searched_routing"])  # the routing the check replaced, scored independently
    with torch.no_grad():
        prune(model, found)
        correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in data[2:])
        unprune(model)
    assert check["holdout_top1"]["searched"] == correct / 24


def test_holdout_must_leave_batches_to_search_and_to_check(model, data):
    with pytest.raises(ValueError, match=r"holdout 0.1 of 2 validation batches leaves 2 to search on and 0 to check"):
        search_routing(model, data, 0.7, space=SMALL, holdout=0.1, progress=False)
