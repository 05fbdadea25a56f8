"""DiffRate's differentiable rate search (``strategy="diffrate"``): the relaxation by hand, a short search within
budget, resume to the identical schedule, clear errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from attnprune import Routing, count_flops, prune, unprune
from attnprune.errors import UserError
from attnprune.scoring import SCORERS
from attnprune.search import InfeasibleBudget, RateOptions, search_routing
from attnprune.search.core import STRATEGIES
from attnprune.search.diffrate import flops_penalty, rate_schedule, within_budget
from attnprune.search.relaxation import (
    block_rates,
    expected_kept,
    kept_candidates,
    masked_softmax,
    merge_in_place,
    relaxed_flops,
    relaxed_forward,
    straight_through_min,
    token_mask,
)
from attnprune.search.state import SearchState
from attnprune.vit import embed
from tests.conftest import tiny_vit
from tests.diffrate_search_reference import FIXTURE, IMAGES, flops_units, seeded_data, seeded_vit

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=4)  # 16 patch tokens
FEW = RateOptions(steps=6, batch_size=8)


@pytest.fixture(scope="module")
def model():
    return tiny_vit(**SMALL)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(2)]


def logits_of(*weights: float) -> torch.Tensor:
    """Logits whose softmax is proportional to ``weights``."""
    return torch.tensor(weights).log()


def test_straight_through_counts_by_hand():
    candidates = kept_candidates(16, 4)
    assert candidates.tolist() == [16, 12, 8, 4] and kept_candidates(16, 5).tolist() == [16, 11, 6, 1]
    for weights, kept, gradient in [
        ((1, 1, 1, 1), 10, [1.5, 0.5, -0.5, -1.5]),  # E = 10: p_j (c_j - E) = (6, 2, -2, -6) / 4
        ((1, 1, 1, 2), 9, [1.44, 0.64, -0.16, -1.92]),  # E = 44 / 5 = 8.8, ceiled to 9
    ]:
        logits = logits_of(*weights).requires_grad_(True)
        count = expected_kept(logits, candidates)
        (grad,) = torch.autograd.grad(count, logits)
        assert count.item() == kept and grad.tolist() == pytest.approx(gradient, abs=1e-5)
    tokens, prune_kept, merge_kept = torch.tensor(10.0, requires_grad=True), torch.tensor(7.0), torch.tensor(9.0)
    prune_kept.requires_grad_(True), merge_kept.requires_grad_(True)
    smallest = straight_through_min(tokens, prune_kept, merge_kept)
    grads = torch.autograd.grad(3 * smallest, [tokens, prune_kept, merge_kept], allow_unused=True)
    assert smallest.item() == 7 and grads[0] is None and grads[1].item() == grads[2].item() == 3


def test_masks_by_hand():
    # prefix 1, 16 patches, uniform over (16, 12, 8, 4): position i survives a candidate c when i < c + 1
    (rates,) = block_rates(torch.zeros(1, 2, 4), kept_candidates(16, 4), 1)
    assert rates.prune.item() == rates.merge.item() == 11
    assert rates.prune_survival.tolist() == [1.0] * 5 + [0.75] * 4 + [0.5] * 4 + [0.25] * 4
    survival = rates.prune_survival.clone().requires_grad_(True)
    mask = token_mask(survival, 11, 15)
    assert mask.tolist() == [1.0] * 11 + [0.0] * 4 + [1.0] * 2  # only the live tokens past the kept ones go
    (grad,) = torch.autograd.grad((mask * torch.arange(17.0)).sum(), survival)
    assert grad.tolist() == torch.arange(17.0).tolist()  # straight-through: the survival probabilities' gradient
    logits = torch.randn(1, 1, 4, 4)
    weights = masked_softmax(logits, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    kept = logits[..., [0, 1, 3]].softmax(-1)
    assert torch.allclose(weights[0, 0, [0, 1, 3]][:, [0, 1, 3]], kept[0, 0, [0, 1, 3]], atol=1e-5)
    assert weights[0, 0, [0, 1, 3], 2].abs().max() < 1e-5  # nobody attends to the masked token but itself
    assert torch.allclose(weights[0, 0, 2], logits[0, 0, 2].softmax(-1), atol=1e-5)


def test_merge_in_place_by_hand():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 1.0], [5.0, 5.0]]])
    size = torch.tensor([[[1.0], [1.0], [1.0], [2.0], [1.0], [1.0]]])
    merged, sizes = merge_in_place(x, size, kept=3, stop=5, num_prefix=1)
    expected = torch.tensor([[1, 0], [0.95, 0.05], [0.05, 1], [0.9, 0.1], [0.1, 1], [5, 5]])
    assert torch.allclose(merged[0], expected)  # plain means; merged tokens stay where they were
    cosine = 0.9 / math.sqrt(0.82)  # token 3 goes to token 1 (the class token is never a destination)
    assert sizes[0, :, 0].tolist() == pytest.approx([1, 1 + 2 * cosine, 2, 2 * cosine, 1, 1])  # at least 1 each


def test_relaxed_flops_and_penalty_by_hand(model):
    block = [logits_of(1, 1, 1, 2), torch.zeros(4)]  # block 1 prunes to 9 + 1, merges to 10 + 1: 10 tokens on
    logits = torch.stack([torch.stack(block), torch.full((2, 4), 50.0) * torch.tensor([1.0, 0, 0, 0])])
    logits.requires_grad_(True)
    rates = block_rates(logits, kept_candidates(16, 4), 1)
    flops = relaxed_flops(model, rates)
    c, t, attn, mlp = 32, 17, 4 * 32 * 32, 8 * 32 * 32  # qkv + proj, fc1 + fc2 per token
    constant = 16 * 32 * 3 * 16 + 32 * 4  # patch embedding and head
    by_hand = constant + 2 * (t * attn + 2 * t * t * c) + (10 * attn + 2 * 10 * 10 * c) + (t + 10 + 10) * mlp
    assert flops.item() == by_hand
    routing = Routing.diffrate(*rate_schedule(logits.detach(), 16, 4))
    assert routing == Routing.diffrate([17, 10, 17], [17, 11, 17])
    scorer = SCORERS["cls_attention"].flops(t, c, 2)  # the schedule's routing also pays its scorer
    assert count_flops(model, routing) == by_hand + scorer
    (grad,) = torch.autograd.grad(flops, logits)
    # the count after block 1 sends its MLP's and block 2's attention cost to both kept counts in full
    per_token = mlp + attn + 2 * c * 2 * 10
    assert grad[0, 0].tolist() == pytest.approx([per_token * g for g in [1.44, 0.64, -0.16, -1.92]], rel=1e-5)
    assert grad[0, 1].tolist() == pytest.approx([per_token * g for g in [1.5, 0.5, -0.5, -1.5]], rel=1e-5)
    unpruned = count_flops(model)
    penalty = flops_penalty(flops, 0.5 * unpruned, unpruned, 5.0)
    assert penalty.item() == pytest.approx(5 * (4.6 * (by_hand - 0.5 * unpruned) / unpruned) ** 2)


def test_relaxed_pruning_is_the_pruned_model(model, data):
    """Masked tokens stop contributing: pruning by masks gives the pruned model's outputs."""
    keep_all = torch.tensor([50.0, 0, 0, 0])
    logits = torch.stack(
        [torch.stack([logits_of(1, 1, 1, 2), keep_all]), torch.stack([logits_of(1, 1, 2, 4), keep_all])]
    )
    images = data[0][0]
    with torch.no_grad():
        relaxed = relaxed_forward(model, embed(model, images), block_rates(logits, kept_candidates(16, 4), 1))
        routing = Routing.diffrate(*rate_schedule(logits, 16, 4))
        assert routing.token_counts(3, 16) == [16, 16, 9, 8]
        pruned = prune(model, routing)(images)
        unprune(model)
    assert torch.allclose(relaxed, pruned, atol=1e-4)


def test_rate_search_reaches_the_budget(model, data):
    assert "diffrate" in STRATEGIES
    result = search_routing(model, data, 0.6, strategy="diffrate", holdout=0, rates=FEW, progress=False)
    report = result.report
    assert count_flops(model, result.routing) <= 0.6 * count_flops(model) and report["flops_ratio"] <= 0.6
    assert result.routing.name == "diffrate" and report["strategy"] == "diffrate" and report["objective"] == "kl"
    assert report["forward_backward_passes"] == 6 and report["images_seen"] == pytest.approx(24 + 6 * 8 + 24)
    schedule = report["rate_schedule"]
    assert len(schedule["prune_kept"]) == 3 and schedule["prune_kept"][0] == 17
    top1 = search_routing(model, data, 0.6, strategy="diffrate", objective="top1", rates=FEW, progress=False)
    assert top1.report["objective"] == "top1" and "check" in top1.report
    assert count_flops(model, top1.routing) <= 0.6 * count_flops(model)


def test_a_schedule_above_budget_moves_within():
    model = tiny_vit(**{**SMALL, "depth": 4})
    full = [17] * 4
    target = count_flops(model, Routing.diffrate([17, 17, 17, 16], full))
    routing, moved = within_budget(model, full, full, target)  # every block leaves 17: the deepest prunes one
    assert moved == 1 and routing == Routing.diffrate([17, 17, 17, 16], full)
    schedule = [17, 12, 12, 9], [17, 10, 12, 9]  # leaves 10, 10, 9: block 2 merges none, so it prunes one more
    target = count_flops(model, Routing.diffrate([17, 12, 9, 9], [17, 10, 12, 9]))
    assert within_budget(model, *schedule, target) == (Routing.diffrate([17, 12, 9, 9], [17, 10, 12, 9]), 1)
    with pytest.raises(InfeasibleBudget):
        within_budget(model, full, full, 0)


def test_resume_gives_the_identical_schedule(model, data, tmp_path, monkeypatch):
    full = search_routing(
        model, data, 0.7, strategy="diffrate", holdout=0, rates=FEW, state_path=tmp_path / "full.json", progress=False
    )
    checkpoint, calls = SearchState.checkpoint, []

    def killed_after_three(self, *args):
        checkpoint(self, *args)
        calls.append(self.step)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(SearchState, "checkpoint", killed_after_three)
    path = tmp_path / "killed.json"
    with pytest.raises(KeyboardInterrupt):
        search_routing(model, data, 0.7, strategy="diffrate", holdout=0, rates=FEW, state_path=path, progress=False)
    assert json.loads(path.read_text())["step"] == 3
    monkeypatch.setattr(SearchState, "checkpoint", checkpoint)
    resumed = search_routing(
        model, data, 0.7, strategy="diffrate", holdout=0, rates=FEW, state_path=path, progress=False
    )
    assert resumed.routing == full.routing and resumed.report["rate_schedule"] == full.report["rate_schedule"]
    saved, again = json.loads((tmp_path / "full.json").read_text()), json.loads(path.read_text())
    assert (
        saved["extra"]["logits"] == again["extra"]["logits"]
        and saved["extra"]["optimizer"] == again["extra"]["optimizer"]
    )
    assert resumed.report["forward_backward_passes"] == 6 and resumed.report["val_kl"] == full.report["val_kl"]
    with pytest.raises(UserError, match="another search"):  # other rate settings: another search
        search_routing(model, data, 0.7, strategy="diffrate", holdout=0, rates=RateOptions(steps=7), state_path=path)


@pytest.mark.parametrize("case", ["kl-g4", "top1-g8", "literal"])
def test_the_official_search_learns_the_same_rates(case, tmp_path):
    """Same model, images, settings and loss as the official search (``tests/diffrate_search_reference.py``): the
    same rate logits and kept counts."""
    official = json.loads(FIXTURE.read_text())["cases"][case]
    model = seeded_vit(case)
    images, labels, _ = seeded_data(model)
    rates = RateOptions(steps=official["steps"], batch_size=IMAGES, granularity=official["granularity"])
    if case == "literal":  # the official penalty in GFLOPs as it is
        rates = replace(rates, flops_weight=flops_units(model, count_flops(model))[1])
    path = tmp_path / "state.json"
    result = search_routing(
        model,
        [(images, labels)],
        official["budget"],
        strategy="diffrate",
        objective=official["objective"],
        holdout=0,
        rates=rates,
        state_path=path,
        progress=False,
    )
    logits = torch.tensor(json.loads(path.read_text())["extra"]["logits"])
    assert torch.allclose(logits, torch.tensor(official["logits"]), atol=1e-5)
    schedule = {"prune_kept": official["prune_kept"], "merge_kept": official["merge_kept"]}
    assert result.report["rate_schedule"] == schedule


@pytest.mark.parametrize(
    "budget, settings, message",
    [
        (1.5, {}, "budget must be a fraction"),
        (0.0, {}, "budget must be a fraction"),
        (0.01, {}, "below the cheapest"),
        (0.6, {"class_token": False, "global_pool": "avg"}, "no class token"),
        (0.6, {"rates": RateOptions(steps=0)}, "rates.steps must be a positive integer"),
        (0.6, {"rates": RateOptions(granularity=16)}, "granularity 16 leaves the 16 patch tokens one candidate"),
        (0.6, {"rates": RateOptions(lr=0.0)}, "lr > 0"),
    ],
)
def test_errors_are_one_line(data, budget, settings, message):
    rates = settings.pop("rates", FEW)
    model = tiny_vit(**{**SMALL, **settings})
    with pytest.raises(UserError, match=message) as error:
        search_routing(model, data, budget, strategy="diffrate", rates=rates, progress=False)
    assert "\n" not in str(error.value)
