"""Budgeted routing search on a tiny ViT: the objective's values, budgets respected, selection, caching exact,
the held-out check, resumable, clear errors."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import replace

import pytest
import torch

from attnprune import Routing, count_flops, prune, unprune
from attnprune.routing import Rule
from attnprune.routing.baselines import matched_baselines
from attnprune.search import (
    Evaluator,
    InfeasibleBudget,
    SearchSpace,
    check_against_baselines,
    cosine_distance,
    kl_divergence,
    search_routing,
    split_holdout,
)
from attnprune.search.beam import _screen_layer, fill_budget
from attnprune.search.check import standard_error
from attnprune.search.core import STRATEGIES
from attnprune.search.space import cheapest_flops, completion
from attnprune.search.state import BeforeFill, Best, SearchState
from attnprune.search.strategy import BeamOptions, SearchContext
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


@torch.no_grad()
def kl_by_hand(model, routing: Routing, images: list) -> torch.Tensor:
    """Per-image KL of ``model`` pruned by ``routing`` from the unpruned model, by plain forward passes."""
    reference = torch.cat([model(x) for x in images])
    prune(model, routing)
    pruned = torch.cat([model(x) for x in images])
    unprune(model)
    return kl_divergence(reference, pruned)


def test_objectives_on_hand_computed_values():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL(p || q) = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    kl = kl_divergence(torch.tensor([[0.0, 0.0], [1.0, 2.0]]), torch.tensor([[math.log(3), 0.0], [1.0, 2.0]]))
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7) and kl[1].item() == pytest.approx(0.0)
    distance = cosine_distance(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0], [-3.0, 0.0]]))
    assert distance.tolist() == pytest.approx([1 - 1 / math.sqrt(2), 2.0])


def test_evaluator_measures_fidelity_and_top1_of_the_pruned_model(model, data):
    evaluator = Evaluator(model, data, "kl")
    unpruned = evaluator.measure(evaluator.initial(), Routing(), 0)
    assert unpruned["kl"] == 0.0 and unpruned["loss"] == 0.0
    with torch.no_grad():
        reference = [model(x) for x, _ in data]
        routing = Routing.from_dict({"rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5, "reduce": "fuse"}]})
        prune(model, routing)
        pruned = [model(x) for x, _ in data]
        unprune(model)
    expected_kl = torch.cat([kl_divergence(r, p) for r, p in zip(reference, pruned, strict=True)]).mean().item()
    expected_top1 = sum((p.argmax(-1) == y).sum().item() for p, (_, y) in zip(pruned, data, strict=True)) / 24
    measured = evaluator.measure(evaluator.initial(), routing, 0)
    assert measured["kl"] == pytest.approx(expected_kl, rel=1e-5) and measured["kl"] > 1e-4
    assert measured["top1"] == expected_top1 and measured["loss"] == measured["kl"]
    first = evaluator.measure(evaluator.initial(), routing, 0, images=15)  # the first 15 images: 12 + 3
    head_kl = torch.cat([kl_divergence(reference[0], pruned[0]), kl_divergence(reference[1][:3], pruned[1][:3])])
    assert first["kl"] == pytest.approx(head_kl.mean().item(), rel=1e-5)
    by_top1 = Evaluator(model, data, "top1").measure(evaluator.initial(), routing, 0)
    assert by_top1["loss"] == pytest.approx(1 - expected_top1)


def test_cosine_ranks_by_the_features_on_a_model_with_a_head(model, data):
    """objective="cosine" on a classifier is the cosine distance of the pooled features its head reads (computed here
    by plain forward passes), not KL: on this model the two objectives order std and l2_norm drops oppositely, and
    the search returns the best by the objective it reports."""
    routings = {
        score: Routing.from_dict({"rules": [{"layer": 1, "score": score, "keep": 0.5, "reduce": "drop"}]})
        for score in ("std", "l2_norm")
    }
    by_kl, by_cosine = Evaluator(model, data, "kl"), Evaluator(model, data, "cosine")
    with torch.no_grad():
        features = [model.forward_head(model.forward_features(x), pre_logits=True) for x, _ in data]
        losses = {}
        for score, routing in routings.items():
            prune(model, routing)
            pruned = [model.forward_head(model.forward_features(x), pre_logits=True) for x, _ in data]
            unprune(model)
            expected = torch.cat([cosine_distance(f, p) for f, p in zip(features, pruned, strict=True)]).mean().item()
            measured = by_cosine.measure(by_cosine.initial(), routing, 0)
            assert measured["loss"] == measured["cosine"] == pytest.approx(expected, rel=1e-5) and "kl" not in measured
            losses[score] = (by_kl.measure(by_kl.initial(), routing, 0)["loss"], measured["loss"])
    assert losses["std"][0] < losses["l2_norm"][0] and losses["l2_norm"][1] < losses["std"][1]
    space = SearchSpace(scorers=("l2_norm", "std"), reducers=("drop",), keeps=(0.5,), layers=(1,), shortlist=0)
    budget = count_flops(model, routings["std"]) / count_flops(model, Routing())
    for objective, best in (("kl", "std"), ("cosine", "l2_norm")):
        result = search_routing(model, data, budget, space=space, objective=objective, holdout=0, progress=False)
        assert result.routing.rules[0].score == best and result.report["objective"] == objective
        assert (
            result.report["val_loss"]
            == result.report[f"val_{objective}"]
            == pytest.approx(losses[best][objective == "cosine"])
        )


def test_budget_is_respected(model, data):
    unpruned = count_flops(model, Routing())
    rng = random.Random(0)
    for budget in [rng.uniform(0.45, 0.95) for _ in range(3)]:
        for strategy in ("beam", "transition"):
            result = search_routing(model, data, budget, space=SMALL, strategy=strategy, holdout=0, progress=False)
            assert count_flops(model, result.routing) <= budget * unpruned
            assert result.report["flops_ratio"] <= budget and result.report["objective"] == "kl"
            assert result.report["val_loss"] == result.report["val_kl"] >= 0 and "val_top1" in result.report
            assert result.report["candidates_evaluated"] > 1 and result.report["images"] == 24


def test_selection_keeps_the_better_of_two_candidates_of_known_quality(model, data):
    """At budget 1, "no rule" is lossless (KL 0) and the only other candidates drop half the tokens: whatever the
    screening order or the beam's bookkeeping, the lossless routing must come out."""
    space = SearchSpace(scorers=("l2_norm", "std"), reducers=("drop",), keeps=(0.5,), layers=(0,), shortlist=0)
    result = search_routing(model, data, 1.0, space=space, holdout=0, beam_width=1, finalists=1, progress=False)
    assert len(result.routing) == 0 and result.report["val_kl"] == 0.0
    state = SearchState("any")
    worse, better = Routing.tome(2, 4), Routing.tome(1, 4)
    state.consider(worse, {"loss": 0.5})
    state.consider(better, {"loss": 0.25})
    state.consider(worse, {"loss": 0.25})  # a tie keeps the earlier candidate
    assert state.best.routing == better and state.best.metrics == {"loss": 0.25}


def test_a_routing_exactly_at_the_budget_is_within_it(model, data):
    """The space's only routing within budget costs exactly the budget: it is feasible (<=), not refused (<)."""
    space = SearchSpace(scorers=("l2_norm",), reducers=("drop",), keeps=(0.5,), layers=(0,), shortlist=0)
    only = Routing.from_dict({"rules": [{"layer": 0, "score": "l2_norm", "keep": 0.5, "reduce": "drop"}]})
    unpruned = count_flops(model, Routing())
    budget = count_flops(model, only) / unpruned
    assert budget * unpruned == count_flops(model, only)  # exact in floating point, so the boundary is tested
    result = search_routing(model, data, budget, space=space, holdout=0, progress=False)
    assert result.routing.rules == only.rules and result.report["flops"] == count_flops(model, only)
    with pytest.raises(InfeasibleBudget):
        search_routing(model, data, budget * (1 - 1e-9), space=space, holdout=0, progress=False)


def test_fill_spends_the_budget_left_without_raising_the_loss(model, data):
    evaluator, space = Evaluator(model, data, "kl"), SearchSpace(keeps=(0.5, 0.7, 0.9))
    harsh = Routing.from_dict({"rules": [{"layer": 0, "score": "l2_norm", "keep": 0.5, "reduce": "drop"}]})
    target = 0.99 * count_flops(model, Routing())  # removing the rule would cost 100%: keep 0.9 is the mildest
    harsh_loss = evaluator.measure(evaluator.initial(), harsh, 0)["loss"]

    def fill(loss: float) -> Routing:
        state = SearchState("any", best=Best(harsh, {"loss": loss}))
        fill_budget(model, evaluator, space, target, state)
        assert state.best.metrics["loss"] <= loss and state.before_fill.metrics["loss"] == loss
        return state.best.routing

    assert fill(loss=0.0) == harsh  # no milder routing can beat a lossless score: nothing changes
    filled = fill(loss=harsh_loss)
    assert filled.rules[0].keep in (0.7, 0.9) and count_flops(model, harsh) < count_flops(model, filled) <= target
    assert evaluator.measure(evaluator.initial(), filled, 0)["loss"] <= harsh_loss
    result = search_routing(model, data, 0.9, space=SMALL, holdout=0, progress=False)
    before = result.report["before_fill"]
    assert result.report["flops_ratio"] >= before["flops_ratio"] and result.report["val_loss"] <= before["val_loss"]


def test_fill_follows_the_cheapest_screened_move_until_the_loss_would_rise(model, data):
    """Three drops at keep 0.5; each step makes one rule milder (0.5 -> 0.7 -> 0.9 -> removed), among the moves within
    budget takes the lowest loss on the first 5 images (ties to more FLOPs, then the earlier rule), and keeps it
    while the loss on all 24 images does not rise. The budget is exactly the FLOPs of one reachable routing, which
    must count as within it. The steps are replayed here by hand."""
    evaluator, space = Evaluator(model, data, "kl"), SearchSpace(keeps=(0.5, 0.7, 0.9))
    rules = [{"layer": layer, "score": "l2_norm", "keep": 0.5, "reduce": "drop"} for layer in (0, 1, 2)]
    start = Routing.from_dict({"rules": rules})
    edge = Routing.from_dict({"rules": [{**rules[0], "keep": 0.7}, rules[1], {**rules[2], "keep": 0.9}]})
    target = count_flops(model, edge)

    def loss(routing: Routing, images: int | None = None) -> float:
        return evaluator.measure(evaluator.initial(), routing, 0, images)["loss"]

    best, best_loss, steps = start, loss(start), 0
    while True:
        moves = []
        for index, rule in enumerate(best.rules):
            changed = [r.to_dict() for r in best.rules]
            keeps = [k for k in space.keeps if k > rule.keep]
            changed[index : index + 1] = [{**changed[index], "keep": min(keeps)}] if keeps else []
            routing = Routing.from_dict({"rules": changed})
            if count_flops(model, routing) <= target:
                moves.append((loss(routing, 5), -count_flops(model, routing), index, routing))
        if not moves:
            break
        chosen = min(moves, key=lambda move: move[:3])[3]
        if loss(chosen) > best_loss:
            break
        best, best_loss, steps = chosen, loss(chosen), steps + 1
    assert steps >= 2  # the replay takes several moves, so the order of the moves matters
    state = SearchState("any", best=Best(start, {"loss": loss(start)}))
    fill_budget(model, evaluator, space, target, state, screen_images=5)
    assert state.best.routing == best
    assert state.best.metrics["loss"] == pytest.approx(best_loss, rel=1e-6)


class TableEvaluator:
    """Losses looked up by each rule's (layer, keep), screened (on ``screen`` images) and confirmed (on all) apart:
    the fill's choices then follow from the table alone, however the tiny model's own losses would rank them."""

    def __init__(self, screened: dict, confirmed: dict, screen: int) -> None:
        self.screened, self.confirmed, self.screen = screened, confirmed, screen

    def initial(self) -> str:
        return "input"

    def measure(self, states: str, routing: Routing, start: int, images: int | None = None) -> dict[str, float]:
        assert states == "input" and start == 0  # the fill measures whole routings from the input
        key = tuple((rule.layer, rule.keep) for rule in routing.rules)
        table = self.confirmed if images is None else self.screened
        assert images in (None, self.screen)
        return {"loss": table.get(key, 10.0)}


def test_fill_takes_the_screened_best_move_ties_to_more_flops_and_stops_when_confirmed_loss_rises(model):
    """Two drops at keep 0.5 (layers 0 and 2), keeps (0.5, 0.9). Step 1: softening layer 2 screens best although
    softening layer 0 adds more FLOPs and confirms better; its confirmed loss equals the current one, which counts
    as not rising. Step 2: both moves screen equal, so the one with more FLOPs (layer 0) is taken; its confirmed loss
    rises, so the fill stops at step 1's routing."""
    space = SearchSpace(keeps=(0.5, 0.9))
    start = ((0, 0.5), (2, 0.5))
    screened = {((0, 0.9), (2, 0.5)): 2.0, ((0, 0.5), (2, 0.9)): 1.0, ((0, 0.9), (2, 0.9)): 1.0, ((0, 0.5),): 1.0}
    confirmed = {start: 5.0, ((0, 0.9), (2, 0.5)): 3.0, ((0, 0.5), (2, 0.9)): 5.0, ((0, 0.9), (2, 0.9)): 6.0}
    confirmed[((0, 0.5),)] = 4.0

    def routing(keeps: tuple) -> Routing:
        return Routing.from_dict(
            {"rules": [{"layer": layer, "score": "l2_norm", "keep": k, "reduce": "drop"} for layer, k in keeps]}
        )

    assert count_flops(model, routing(((0, 0.9), (2, 0.9)))) > count_flops(model, routing(((0, 0.5),)))
    assert count_flops(model, routing(((0, 0.9), (2, 0.5)))) > count_flops(model, routing(((0, 0.5), (2, 0.9))))
    state = SearchState("any", best=Best(routing(start), {"loss": 5.0}))
    evaluator = TableEvaluator(screened, confirmed, screen=5)
    fill_budget(model, evaluator, space, count_flops(model, Routing()), state, screen_images=5)
    assert state.best.routing == routing(((0, 0.5), (2, 0.9)))
    assert state.best.metrics == {"loss": 5.0}
    assert state.before_fill == BeforeFill({"loss": 5.0}, count_flops(model, routing(start)))


def test_beam_fills_the_budget_it_leaves_and_saves_the_filled_routing(model, data, tmp_path):
    """Rules in every block leave no block to a ToMe completion, so the beam's best falls short of the budget and the
    fill gives tokens back. The filled routing is what the state file holds, and a rerun from it repeats no fill."""
    space = SearchSpace(scorers=("l2_norm",), reducers=("drop",), keeps=(0.5, 0.7, 0.9), layers=(0, 1, 2, 3))
    path = tmp_path / "state.json"
    result = search_routing(model, data, 0.8, space=space, holdout=0, state_path=path, screen_images=5, progress=False)
    report, saved = result.report, json.loads(path.read_text())
    assert report["before_fill"]["flops_ratio"] < report["flops_ratio"] <= 0.8
    assert report["strategy"] == "beam" and report["budget"] == 0.8
    assert Routing.from_dict(saved["best"]["routing"]) == result.routing and "before_fill" in saved
    again = search_routing(model, data, 0.8, space=space, holdout=0, state_path=path, screen_images=5, progress=False)
    assert again.routing == result.routing and again.report["before_fill"] == report["before_fill"]
    assert again.report["candidates_evaluated"] == report["candidates_evaluated"]


def test_an_interrupted_search_fills_as_fill_budget_does_screening_on_screen_images(model, data, tmp_path, monkeypatch):
    """Killed after its last beam step, the search saved the routing before the fill; resumed, it fills exactly as
    ``fill_budget`` does from that state with the same screening size: the same routing, candidates and block
    passes (each side counting one reference pass)."""
    space = SearchSpace(scorers=("l2_norm",), reducers=("drop",), keeps=(0.5, 0.7, 0.9), layers=(0, 1, 2, 3))
    path, calls, original = tmp_path / "state.json", {"n": 0}, SearchState.checkpoint

    def dies_before_the_fill(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == 4:  # the fourth and last beam step
            raise KeyboardInterrupt

    def search():
        return search_routing(
            model, data, 0.8, space=space, holdout=0, state_path=path, screen_images=5, progress=False
        )

    monkeypatch.setattr(SearchState, "checkpoint", dies_before_the_fill)
    with pytest.raises(KeyboardInterrupt):
        search()
    monkeypatch.setattr(SearchState, "checkpoint", original)
    before = json.loads(path.read_text())
    assert before["step"] == 4 and "before_fill" not in before
    replay, evaluator = SearchState.from_json(before), Evaluator(model, data, "kl")
    fill_budget(model, evaluator, space, 0.8 * count_flops(model, Routing()), replay, screen_images=5)
    result = search()
    after = json.loads(path.read_text())
    assert result.routing == replay.best.routing
    assert result.routing != Routing.from_dict(before["best"]["routing"])  # the fill moved
    assert after["candidates"] - before["candidates"] == evaluator.candidates
    assert after["block_passes"] - before["block_passes"] == pytest.approx(evaluator.block_passes)


def test_prefix_caching_gives_the_same_measurement(model, data):
    evaluator = Evaluator(model, data, "kl")
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
    assert evaluator.measure(cached, routing, 2) == evaluator.measure(evaluator.initial(), routing, 0)
    cached_search = search_routing(model, data, 0.7, space=SMALL, holdout=0, progress=False)
    uncached_search = search_routing(model, data, 0.7, space=SMALL, holdout=0, prefix_cache=False, progress=False)
    assert cached_search.routing == uncached_search.routing
    assert cached_search.report["val_kl"] == uncached_search.report["val_kl"]
    assert cached_search.report["block_passes"] < uncached_search.report["block_passes"]


def test_killed_search_resumes_to_the_same_result(model, data, tmp_path, monkeypatch):
    full = search_routing(model, data, 0.7, space=SMALL, progress=False)
    state = tmp_path / "state.json"
    calls = {"n": 0}
    original = SearchState.checkpoint

    def dies_after_two_steps(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SearchState, "checkpoint", dies_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        search_routing(model, data, 0.7, space=SMALL, state_path=state, progress=False)
    monkeypatch.setattr(SearchState, "checkpoint", original)
    assert '"step": 2' in state.read_text()
    resumed = search_routing(model, data, 0.7, space=SMALL, state_path=state, progress=False)
    assert resumed.routing == full.routing and resumed.report["val_kl"] == full.report["val_kl"]
    assert resumed.report["check"] == full.report["check"]
    assert resumed.report["candidates_evaluated"] == full.report["candidates_evaluated"]
    again = search_routing(model, data, 0.7, space=SMALL, state_path=state, progress=False)  # finished: no new work
    assert again.report["candidates_evaluated"] == full.report["candidates_evaluated"] and again.routing == full.routing
    with pytest.raises(ValueError, match=r"belongs to another search \(it was searched with budget 0.7, this search"):
        search_routing(model, data, 0.6, space=SMALL, state_path=state, progress=False)
    retrained_head = copy.deepcopy(model)  # same backbone, another classifier: the saved state no longer applies
    with torch.no_grad():
        retrained_head.head.bias[0] += 1.0
    with pytest.raises(ValueError, match=r"belongs to another search \(it searched another model \(the weights"):
        search_routing(retrained_head, data, 0.7, space=SMALL, state_path=state, progress=False)
    relabelled = [(images, (labels + 1) % 4) for images, labels in data]  # same images, other labels
    with pytest.raises(
        ValueError, match=r"\(it searched other images or labels \(17 images, fingerprint [0-9a-f]{16}; "
    ):
        search_routing(model, relabelled, 0.7, space=SMALL, state_path=state, progress=False)
    with pytest.raises(ValueError, match=r"\(it was searched with space.keeps \[0.7\], this search has \[0.6\]\)"):
        search_routing(model, data, 0.7, space=replace(SMALL, keeps=(0.6,)), state_path=state, progress=False)
    state.write_text("{not json")
    with pytest.raises(ValueError, match=rf"search state {state} is not valid JSON"):
        search_routing(model, data, 0.7, space=SMALL, state_path=state, progress=False)
    with pytest.raises(ValueError, match=rf"state_path {tmp_path} is a directory"):
        search_routing(model, data, 0.7, space=SMALL, state_path=tmp_path, progress=False)


def test_state_round_trips_through_the_json_of_a_state_file():
    """A state file holds rules and routings as routing files write them; loading one gives Rules and a Routing, and
    saving it again gives the same JSON, so a state saved before a restart resumes exactly."""
    saved = {
        "fingerprint": "0123456789abcdef",
        "step": 2,
        "beam": [
            [
                {"layer": 0, "score": "l2_norm", "keep": 0.7, "reduce": "fuse"},
                {"layer": 1, "keep": 0.8, "reduce": "merge"},
            ],
            [],
        ],
        "best": {
            "routing": {
                "name": "searched",
                "prop_attn": True,
                "seed": 0,
                "rules": [
                    {"layer": 0, "score": "l2_norm", "keep": 0.7, "reduce": "fuse"},
                    {"layer": 2, "r": 5, "reduce": "merge"},
                ],
            },
            "metrics": {"kl": 0.25, "top1": 0.5, "loss": 0.25},
        },
        "candidates": 17,
        "block_passes": 40.5,
        "seconds": 1.25,
        "before_fill": {"metrics": {"kl": 0.5, "loss": 0.5}, "flops": 123456},
    }
    state = SearchState.from_json(json.loads(json.dumps(saved)))
    assert state.beam == [(Rule(0, score="l2_norm", keep=0.7, reduce="fuse"), Rule(1, keep=0.8, reduce="merge")), ()]
    assert state.best.routing == Routing(
        (Rule(0, "l2_norm", 0.7, reduce="fuse"), Rule(2, r=5, reduce="merge")), "searched"
    )
    assert state.before_fill == BeforeFill({"kl": 0.5, "loss": 0.5}, 123456) and state.transition_depth is None
    assert json.dumps(state.to_json()) == json.dumps(saved)  # the same keys in the same order
    fresh = SearchState("0123456789abcdef")
    assert fresh.to_json() == {
        "fingerprint": "0123456789abcdef",
        "step": 0,
        "beam": [[]],
        "best": None,
        "candidates": 0,
        "block_passes": 0.0,
        "seconds": 0.0,
    }
    fresh.transition_depth = 3
    assert SearchState.from_json(fresh.to_json()) == fresh and fresh.to_json()["transition_depth"] == 3


def test_state_is_saved_atomically_and_loaded_only_by_its_own_search(tmp_path):
    path = tmp_path / "deep" / "state.json"
    state = SearchState("mine", step=1)
    state.consider(Routing.tome(1, 4), {"loss": 0.5})
    state.save(path)
    assert SearchState.load(path, "mine") == state and not path.with_suffix(".tmp").exists()
    assert SearchState.load(tmp_path / "absent.json", "mine") is None and SearchState.load(None, "mine") is None
    with pytest.raises(ValueError, match="belongs to another search"):
        SearchState.load(path, "another")


def test_strategies_are_registered_by_name_and_called_with_one_context(model, data, monkeypatch):
    """Every strategy takes the same two arguments: the context (model, evaluator, space, target FLOPs, state path,
    progress and the beam's options) and the state it leaves the best routing in. A strategy added to the registry
    is run by name like the built-in ones."""
    assert list(STRATEGIES) == ["beam", "transition", "label_free", "diffrate"]
    seen = {}

    def unpruned_only(context: SearchContext, state: SearchState) -> None:
        seen["context"] = context
        state.consider(Routing(), context.evaluator.measure(context.evaluator.initial(), Routing(), 0))
        state.step = 1
        state.checkpoint(context.evaluator, context.path, time.perf_counter())

    monkeypatch.setitem(STRATEGIES, "unpruned_only", unpruned_only)
    result = search_routing(
        model,
        data,
        1.0,
        space=SMALL,
        strategy="unpruned_only",
        holdout=0,
        beam_width=3,
        prefix_cache=False,
        screen_images=7,
        finalists=5,
        progress=False,
    )
    context = seen["context"]
    assert context.options == BeamOptions(beam_width=3, prefix_cache=False, screen_images=7, finalists=5)
    assert context.model is model and context.space == SMALL and context.path is None and not context.progress
    assert context.target == count_flops(model, Routing()) and context.evaluator.images == 24
    assert result.routing == Routing() and result.report["strategy"] == "unpruned_only"
    assert result.report["val_kl"] == 0.0 and result.report["candidates_evaluated"] == 1


def test_completion_caps_each_merge_at_what_bipartite_matching_allows(model):
    """64 tokens, ToMe in blocks 0-2: the tightest completion merges 32, 16 and 8 (half of what reaches each block),
    the cheapest routing of a merge-only space; a uniform r cannot get there without an invalid r (32 in block 1).
    After a fixed drop to 45 tokens in block 0, blocks 1-2 merge at most 22 and 11; nothing meets 0 FLOPs."""
    merge_only = SearchSpace(reducers=("merge",), layers=(0, 1, 2))
    tightest = completion(model, [], [0, 1, 2], cheapest_flops(model, merge_only))
    assert [(rule.layer, rule.r) for rule in tightest.rules] == [(0, 32), (1, 16), (2, 8)]
    assert count_flops(model, tightest) == cheapest_flops(model, merge_only)
    drop = Rule(0, score="l2_norm", keep=0.7, reduce="drop")
    assert completion(model, [drop], [1, 2], 0) is None
    cheapest = Routing((drop, Rule(1, r=22, reduce="merge"), Rule(2, r=11, reduce="merge")))
    capped = completion(model, [drop], [1, 2], count_flops(model, cheapest))
    assert capped == Routing(cheapest.rules, name="searched")


def test_a_beam_wider_than_the_space_finds_the_exhaustive_best(model, data, tmp_path):
    """With the beam and the finalists wider than every layer's candidates, the beam keeps every partial routing:
    it ends holding every full combination within budget, and before the budget fill it must return the lowest loss
    over those and every completed partial routing, enumerated here by hand (3 layers, 4 rules each: none, a merge,
    two drops)."""
    space = SearchSpace(scorers=("l2_norm",), reducers=("drop", "merge"), keeps=(0.6, 0.8), merge_keeps=(0.7,))
    target = 0.7 * count_flops(model, Routing())
    evaluator = Evaluator(model, data, "kl")
    layers = space.pruning_layers(len(model.blocks))
    assert layers == [0, 1, 2]
    losses, prefixes = [], [()]
    for step, layer in enumerate(layers):
        grown = []
        for fixed in prefixes:
            for rule in space.candidates(layer, True):
                rules = fixed + ((rule,) if rule is not None else ())
                routing = completion(model, rules, layers[step + 1 :], target)
                if routing is not None:
                    losses.append(evaluator.measure(evaluator.initial(), routing, 0)["loss"])
                    grown.append(rules)
        prefixes = grown
    path = tmp_path / "state.json"
    result = search_routing(
        model,
        data,
        0.7,
        space=space,
        holdout=0,
        state_path=path,
        beam_width=100,
        finalists=100,
        screen_images=5,
        progress=False,
    )
    kept = json.loads(path.read_text())["beam"]
    expected = [[rule.to_dict() for rule in rules] for rules in prefixes]
    assert sorted(map(json.dumps, kept)) == sorted(map(json.dumps, expected)) and len(prefixes) > 20
    assert result.report["before_fill"]["val_loss"] == pytest.approx(min(losses), rel=1e-6)
    assert result.report["val_loss"] <= min(losses)  # the fill only ever lowers it


def test_screening_on_fewer_images_costs_fewer_block_passes(model, data):
    """Every candidate is screened on the first ``screen_images`` images only: screening on 5 of the 24 runs fewer
    blocks than screening on all of them (which confirms nothing new)."""
    passes = {
        images: search_routing(
            model, data, 0.7, space=SMALL, holdout=0, screen_images=images, finalists=2, progress=False
        ).report["block_passes"]
        for images in (5, 24)
    }
    assert passes[5] < 0.6 * passes[24]


def test_scorers_are_shortlisted_by_one_probe_each(model, data):
    """With ``shortlist=1`` of three scorers, a layer screens one drop per scorer at the median keep, then every keep
    and reducer of the best-probed scorer only; each screened loss is the objective on the first 5 images."""
    space = SearchSpace(scorers=("l2_norm", "std", "cls_attention"), keeps=(0.6, 0.7, 0.8), shortlist=1)
    evaluator = Evaluator(model, data, "kl")
    target = 0.7 * count_flops(model, Routing())
    options = BeamOptions(screen_images=5)

    def screen(space: SearchSpace) -> list:
        context = SearchContext(model, evaluator, space, target, options=options)
        return _screen_layer(context, (), (evaluator.initial(), 0), 0, [1, 2])

    screened = screen(space)
    probes = [Rule(0, score=s, keep=0.7, reduce="drop") for s in ("l2_norm", "std", "cls_attention")]
    probe_loss = {}
    for rule in probes:
        routing = completion(model, [rule], [1, 2], target)
        probe_loss[rule.score] = evaluator.measure(evaluator.initial(), routing, 0, 5)["loss"]
    best = min(probe_loss, key=probe_loss.get)
    expected = [(p,) for p in probes] + [
        (rule,) if rule is not None else ()
        for rule in space.candidates(0, True, [best], len(model.blocks))
        if rule not in probes
    ]
    assert [rules for _, rules, _ in screened] == expected
    for loss, rules, routing in screened:
        assert routing == completion(model, rules, [1, 2], target)
        assert loss == pytest.approx(evaluator.measure(evaluator.initial(), routing, 0, 5)["loss"], rel=1e-6)
    unlisted = screen(SMALL)
    expected = [(rule,) if rule is not None else () for rule in SMALL.candidates(0, True)]  # no shortlist: all
    assert [rules for _, rules, _ in unlisted] == expected and any("cls_attention" in str(r) for r in expected)
    off = screen(replace(space, shortlist=0))
    assert [rules for _, rules, _ in off] == [
        (r,) if r is not None else () for r in space.candidates(0, True, depth=len(model.blocks))
    ]


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="a progress bar hangs mutmut's forked test runs")
def test_progress_bar_counts_the_layers_and_stays_silent_when_off(model, data, capsys):
    search_routing(model, data, 0.7, space=SMALL, holdout=0, progress=False)
    assert "routing search" not in capsys.readouterr().err
    search_routing(model, data, 0.7, space=SMALL, holdout=0)  # on by default
    err = capsys.readouterr().err
    assert "routing search (beam)" in err and "3/3" in err


def test_a_default_search_uses_the_documented_settings(model, data, tmp_path):
    """A search state resumes only under the very settings that made it: the finished default search reruns, with no
    new work, when its settings are spelled out as documented (beam width 2, screening on 256 images, 4 finalists,
    30% held out, checked at confidence 0.5), and refuses a rerun with any one of them changed."""
    path = tmp_path / "state.json"
    first = search_routing(model, data, 0.7, space=SMALL, state_path=path, progress=False)
    assert first.report["check"]["confidence"] == 0.5 and first.report["images"] == round(0.7 * 24)
    documented = {"beam_width": 2, "screen_images": 256, "finalists": 4, "holdout": 0.3, "objective": "fidelity"}
    again = search_routing(model, data, 0.7, space=SMALL, state_path=path, progress=False, **documented)
    assert again.routing == first.routing
    assert again.report["candidates_evaluated"] == first.report["candidates_evaluated"]
    for setting, value in (("beam_width", 3), ("screen_images", 257), ("finalists", 5)):
        with pytest.raises(ValueError, match=f"belongs to another search \\(it was searched with {setting} "):
            search_routing(model, data, 0.7, space=SMALL, state_path=path, progress=False, **{setting: value})


def test_infeasible_budget_names_the_cheapest_flops(model, data):
    unpruned, cheapest = count_flops(model, Routing()), cheapest_flops(model, SMALL)
    message = (
        f"budget 0.05 ({0.05 * unpruned / 1e9:.4g} GFLOPs) is below the cheapest routing the search space reaches: "
        f"{cheapest / 1e9:.4g} GFLOPs ({cheapest / unpruned:.1%} of the unpruned model)"
    )
    with pytest.raises(InfeasibleBudget, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        search_routing(model, data, 0.05, space=SMALL, progress=False)


def test_label_free_picks_a_transition_routing_without_labels(model, data):
    images_only = [images for images, _ in data]
    result = search_routing(model, images_only, 0.7, space=SMALL, strategy="label_free", holdout=0, progress=False)
    assert result.routing.name.startswith("transition-t") and "val_top1" not in result.report
    depth = result.report["transition_depth"]  # the routing ranks by attention from the transition depth on
    # the model's depth: attention never takes the lead (as on this random tiny model under torch 2.14.1/timm 1.0.31)
    assert result.routing.name.startswith(f"transition-t{depth}-") and 0 <= depth <= len(model.blocks)
    assert "check" not in result.report  # holdout 0 checks nothing
    assert result.report["candidates_evaluated"] == 1 and result.report["val_kl"] > 0
    with pytest.raises(ValueError, match="unknown search strategy 'greedy'"):
        search_routing(model, data, 0.7, strategy="greedy")
    with pytest.raises(ValueError, match="objective 'top1' needs labels"):
        search_routing(model, images_only, 0.7, space=SMALL, objective="top1", progress=False)


def test_headless_model_is_searched_by_cosine_distance_of_its_features(data):
    backbone = tiny_vit(num_classes=0)
    result = search_routing(backbone, data, 0.7, space=SMALL, progress=False)
    assert result.report["objective"] == "cosine" and 0 < result.report["val_cosine"] < 1
    assert set(result.report["check"]["holdout"]["searched"]) == {"cosine", "loss"}
    with pytest.raises(ValueError, match="objective 'kl' needs class logits, but the model is headless"):
        search_routing(backbone, data, 0.7, space=SMALL, objective="kl", progress=False)


def test_model_without_class_token_is_checked_against_tome_only(data):
    """EViT and attention top-k rank by class-token attention: an average-pool model without one has neither."""
    pooled = tiny_vit(num_classes=4, class_token=False, global_pool="avg")
    result = search_routing(
        pooled, data, 0.7, space=SearchSpace(scorers=("l2_norm",), layers=(0, 1, 2)), progress=False
    )
    assert set(result.report["check"]["holdout"]) == {"searched", "tome", "pitome"}
    assert set(matched_baselines(pooled, 0.7 * count_flops(pooled, Routing()))) == {"tome", "pitome", "random"}


def test_default_holdout_check_returns_a_baseline_when_the_routing_found_is_worse(model, tmp_path):
    """A space of random drops of half the tokens in block 0 finds only poor routings; by default the search checks
    them on held-out images against the baselines by the same KL objective, and returns the best baseline. The
    report counts the check's work and gives the returned baseline's metrics on the searched images."""
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(10, 3, 32, 32, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(4)]
    poor = SearchSpace(scorers=("random",), reducers=("drop",), keeps=(0.5,), layers=(0,), shortlist=0)
    budget, path = 0.6, tmp_path / "state.json"
    start = time.perf_counter()
    result = search_routing(model, data, budget, space=poor, confidence=0.9, state_path=path, progress=False)
    elapsed = time.perf_counter() - start
    check, report = result.report["check"], result.report
    assert report["images"] == 28 and check["holdout_images"] == 12 and check["objective"] == "kl"
    assert check["confidence"] == 0.9 and 0 < report["wall_time_s"] <= elapsed
    # the search's own work (saved in its state), then the check: a reference pass and one pass per contender over
    # 12 images, counted in passes over the 28 searched images, and the returned baseline measured on those 28
    state, depth = json.loads(path.read_text()), len(model.blocks)
    assert report["candidates_evaluated"] == state["candidates"] + 6 + 1
    assert report["block_passes"] == pytest.approx(state["block_passes"] + depth * 7 * 12 / 28 + depth)
    assert report["full_forward_equivalents"] == pytest.approx(report["block_passes"] / depth)
    assert set(check["holdout"]) == {"searched", "tome", "evit", "topk_attention", "pitome", "ppt"}
    losses = {method: metrics["loss"] for method, metrics in check["holdout"].items()}
    best = min(losses, key=losses.get)
    assert best != "searched" and check["returned"] == best and f"the baseline {best}" in check["note"]
    held_out = [data[2][0][8:], data[3][0]]  # the last 12 of 40 images, on which PPT's threshold is calibrated
    calibration = torch.cat(held_out)
    baselines = matched_baselines(model, budget * count_flops(model, Routing()), within=True, calibration=calibration)
    assert result.routing == baselines[best]
    searched = [data[0][0], data[1][0], data[2][0][:8]]  # the first 28 images
    by_hand = kl_by_hand(model, baselines[best], searched).mean().item()
    assert report["val_kl"] == report["val_loss"] == pytest.approx(by_hand)
    found = Routing.from_dict(check["searched_routing"])  # the routing the check replaced, scored independently
    assert found.rules[0].score == "random" and found.rules[0].layer == 0
    assert losses["searched"] == pytest.approx(kl_by_hand(model, found, held_out).mean().item(), rel=1e-5)


def test_check_keeps_the_routing_found_only_when_a_paired_test_says_it_is_better(model, data):
    """The unpruned routing, posed as the routing found, has KL 0 on every image, so it beats each baseline by that
    baseline's per-image KL: the paired bound is mean + z * sd / sqrt(n). At 95% it is below 0 and the routing found
    is kept; at 1 - 1e-12 (z = 7.03) it is not, and the baseline with the lowest held-out loss is returned. A routing
    equal to a baseline never wins (its difference is 0 on every image)."""
    target = 0.6 * count_flops(model, Routing())
    images = [x for x, _ in data]
    baselines = matched_baselines(model, target, within=True, calibration=torch.cat(images))
    held_out = Evaluator(model, data, "kl")
    kls = {
        method: kl_by_hand(model, baselines[method], images).double()
        for method in ("tome", "evit", "topk_attention", "pitome", "ppt")
    }
    best = min(kls, key=lambda m: kls[m].mean().item())
    decisions = {}
    for confidence, z in ((0.95, 1.6448536), (1 - 1e-12, 7.0344838)):
        routing, check = check_against_baselines(model, held_out, Routing(), target, confidence)
        for method, kl in kls.items():
            paired = check["paired"][method]
            assert paired["difference"] == pytest.approx(-kl.mean().item(), rel=1e-5)
            assert paired["standard_error"] == pytest.approx(kl.std().item() / math.sqrt(24), rel=1e-5)
            assert paired["upper_bound"] == pytest.approx(
                -kl.mean().item() + z * kl.std().item() / math.sqrt(24), rel=1e-4
            )
        kept = all(kl.mean() > z * kl.std() / math.sqrt(24) for kl in kls.values())
        assert check["returned"] == ("searched" if kept else best)
        assert routing == (Routing() if kept else baselines[best])
        decisions[confidence] = check["returned"]
    assert decisions == {0.95: "searched", 1 - 1e-12: best}  # the data make the two levels disagree
    assert "with 100% confidence" in check["note"] and f"so {best} is returned" in check["note"]
    assert check["note"].endswith("the routing found is in searched_routing") and check["confidence"] == 1 - 1e-12
    default = check_against_baselines(model, held_out, Routing(), target)[1]  # 0.5 by default: the means decide
    assert default["confidence"] == 0.5 and default["returned"] == "searched" and "note" not in default
    same, tie = check_against_baselines(model, held_out, baselines["tome"], target, 0.5)
    assert tie["paired"]["tome"]["upper_bound"] == 0 and tie["returned"] != "searched"
    with pytest.raises(ValueError, match="search confidence must be in \\[0.5, 1\\), got 1"):
        check_against_baselines(model, held_out, Routing(), target, 1)


def test_check_on_one_or_two_images_and_without_baselines(model, data):
    """One held-out image says nothing of the spread (infinite standard error: a baseline is returned); two give
    the usual bound; a budget no baseline meets leaves the routing found unchallenged."""
    target = 0.6 * count_flops(model, Routing())
    one = Evaluator(model, [(data[0][0][:1], data[0][1][:1])], "kl")
    _, check = check_against_baselines(model, one, Routing(), target, 0.5)
    assert check["paired"]["tome"]["standard_error"] == math.inf and check["returned"] != "searched"
    two = Evaluator(model, [(data[0][0][:2], data[0][1][:2])], "kl")
    _, check = check_against_baselines(model, two, Routing(), target, 0.5)  # z = 0: the mean difference decides
    kl = torch.tensor([check["paired"][m]["difference"] for m in check["paired"]])
    assert check["returned"] == "searched" and (kl < 0).all()
    assert all(0 < p["standard_error"] < math.inf for p in check["paired"].values())
    routing, check = check_against_baselines(model, two, Routing(), 1.0, 0.95)  # 1 FLOP: no baseline fits
    assert routing == Routing() and check["returned"] == "searched" and check["paired"] == {}


def test_standard_error_of_a_hand_computed_paired_difference():
    a, b = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    # differences 0, 1, 0, 1: sample standard deviation sqrt(1/3), over sqrt(4) images
    assert standard_error(a - b) == pytest.approx((1 / 3) ** 0.5 / 2)


def test_a_budget_no_baseline_meets_returns_the_routing_found_as_measured(model, data, tmp_path):
    """At 30% of the FLOPs no baseline fits (ToMe's most merging and EViT stop above it) but a 90% drop in block 0
    does: the check has nothing to compare, returns the routing found with the metrics the search measured, and
    counts only its own reference pass and one contender over the 7 held-out images."""
    space = SearchSpace(scorers=("l2_norm",), reducers=("drop",), keeps=(0.1,), layers=(0,))
    assert matched_baselines(model, 0.3 * count_flops(model, Routing()), within=True) == {}
    path = tmp_path / "state.json"
    result = search_routing(model, data, 0.3, space=space, state_path=path, progress=False)
    report, state, depth = result.report, json.loads(path.read_text()), len(model.blocks)
    assert report["check"]["returned"] == "searched" and set(report["check"]["holdout"]) == {"searched"}
    assert (
        result.routing == Routing.from_dict(state["best"]["routing"])
        and report["val_kl"] == state["best"]["metrics"]["kl"]
    )
    assert report["candidates_evaluated"] == state["candidates"] + 1
    assert report["block_passes"] == pytest.approx(state["block_passes"] + depth * 2 * 7 / 17)


def test_top1_objective_check_returns_the_baseline_that_labels_favour(model):
    """Labels are ToMe's own predictions, so ToMe scores 100% on the held-out images: with objective top1 the
    searched routing survives the check only by matching that."""
    budget = 0.6
    tome = matched_baselines(model, budget * count_flops(model, Routing()), within=True)["tome"]
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(12, 3, 32, 32, generator=g) for _ in range(4)]
    with torch.no_grad():
        prune(model, tome)
        data = [(x, model(x).argmax(-1)) for x in images]
        unprune(model)
    result = search_routing(model, data, budget, space=SMALL, objective="top1", holdout=0.5, progress=False)
    check = result.report["check"]
    assert check["holdout"]["tome"]["top1"] == 1.0 >= check["holdout"]["searched"]["top1"]  # no better than ToMe
    assert check["returned"] == "tome" and result.routing == tome and result.report["val_top1"] == 1.0
    assert result.report["val_loss"] == 0.0  # ToMe's top-1 error on the searched images, the objective here


def test_split_holdout_cuts_by_images():
    batches = [(torch.arange(4).view(4, 1, 1, 1).float(), torch.arange(4)) for _ in range(3)]
    searched, held_out = split_holdout(batches, 0.25)  # 12 images: 9 searched, the last 3 held out
    assert [len(y) for _, y in searched] == [4, 4, 1] and [len(y) for _, y in held_out] == [3]
    assert held_out[0][1].tolist() == [1, 2, 3]
    everything, none = split_holdout(batches, 0)
    assert [y.tolist() for _, y in everything] == [[0, 1, 2, 3]] * 3 and none == []
    _, one = split_holdout(batches, 1 / 12)  # one image is enough to check on
    assert [y.tolist() for _, y in one] == [[3]]
    for holdout, searched_count, held_count in ((0.01, 12, 0), (0.99, 0, 12)):
        message = (
            f"holdout {holdout:g} of 12 validation images leaves {searched_count} to search on and {held_count} to "
            "check on; it must leave at least one image for each"
        )
        with pytest.raises(ValueError, match=f"^{message}$"):
            split_holdout(batches, holdout)
    for holdout in (1.0, -0.1, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match=rf"^holdout must be a fraction .* in \[0, 1\), got {holdout!r}$"):
            split_holdout(batches, holdout)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 1.5}, "search budget must be a fraction of the unpruned model's FLOPs in \\(0, 1\\], got 1.5"),
        ({"budget": float("nan")}, "search budget must be .* got nan"),
        ({"budget": 0}, "search budget must be .* got 0"),
        ({"beam_width": 0}, "search beam_width must be a positive integer, got 0"),
        ({"screen_images": -5}, "search screen_images must be a positive integer, got -5"),
        ({"objective": "accuracy"}, "objective 'accuracy' is not one of fidelity, kl, cosine, top1"),
        ({"budget": "0.5"}, "search budget must be .* got '0.5'"),
        ({"budget": True}, "search budget must be .* got True"),
        ({"beam_width": 2.5}, "search beam_width must be a positive integer, got 2.5"),
        ({"finalists": True}, "^search finalists must be a positive integer, got True$"),
        ({"confidence": "0.9"}, "^search confidence must be in \\[0.5, 1\\), got '0.9'$"),
        ({"holdout": 1.0}, "holdout must be a fraction of the validation images in \\[0, 1\\), got 1.0"),
        (
            {"strategy": "greedy"},
            "^unknown search strategy 'greedy' \\(known: beam, transition, label_free, diffrate\\)$",
        ),
    ],
)
def test_bad_settings_are_refused_before_any_work(model, data, kwargs, message):
    settings = {"budget": 0.7, **kwargs}
    budget = settings.pop("budget")
    with pytest.raises(ValueError, match=message):
        search_routing(model, data, budget, space=SMALL, progress=False, **settings)


def test_bad_data_is_refused_with_what_is_wrong(model, data):
    for empty in ([], [torch.zeros(0, 3, 32, 32)]):
        with pytest.raises(ValueError, match="^search dataloader yielded no images$"):
            search_routing(model, empty, 0.7, space=SMALL, progress=False)
    # the label named is the one out of range: the lowest when negative, else the highest (4 = num_classes)
    for labels, bad in (([7] * 12, 7), ([0] * 11 + [4], 4), ([-1] + [2] * 11, -1), ([-2] + [5] * 11, -2)):
        outside = [(data[0][0], torch.tensor(labels))]
        with pytest.raises(ValueError, match=f"^search dataloader label {bad} is outside the model's 4 classes$"):
            search_routing(model, outside, 0.7, space=SMALL, progress=False)
    one_class = tiny_vit(num_classes=1)
    with pytest.raises(ValueError, match="label 3 is outside the model's 1 classes"):
        search_routing(one_class, [(data[0][0], torch.full((12,), 3))], 0.7, space=SMALL, progress=False)
    with pytest.raises(TypeError, match="got ndarray$"):
        search_routing(model, [data[0][0].numpy()], 0.7, space=SMALL, progress=False)
    with pytest.raises(TypeError, match=r"got a tensor of shape \[3, 32, 32\]"):
        search_routing(model, [torch.zeros(3, 32, 32)], 0.7, space=SMALL, progress=False)


def test_the_peers_reducers_are_moves_of_the_search(model, data):
    """DiffRate's absorb and PiToMe's energy merge are candidates at every layer when the space names them (the
    energy margin PiToMe's code would give the block); every candidate is a valid routing within budget."""
    space = SearchSpace(
        scorers=("cls_attention",), reducers=("absorb", "energy_merge"), keeps=(0.7,), merge_keeps=(0.8,), shortlist=0
    )
    candidates = space.candidates(2, True, depth=4)
    assert candidates[1:] == [
        Rule(2, score="cls_attention", keep=0.7, reduce="absorb"),
        Rule(2, keep=0.8, reduce="energy_merge", margin=0.75 - 0.75 * 2 / 4),
    ]
    result = search_routing(model, data, 0.7, space=space, holdout=0, progress=False)
    assert count_flops(model, result.routing) <= 0.7 * count_flops(model, Routing())
    with pytest.raises(ValueError, match="search candidates of reduce 'energy_merge' need the model's depth"):
        space.candidates(2, True)
    with pytest.raises(ValueError, match="cannot try reduce 'adaptive': it needs threshold, which has no default"):
        SearchSpace(reducers=("adaptive",)).candidates(1, True, depth=4)
