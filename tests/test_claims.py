"""attnprune.selectivity.claims and .transition: each claim's statistic on hand-built attention with a known answer, a
seeded bootstrap; benchmarks/claims.py's table."""

import math

import pytest
import torch

from attnprune.scoring import SCORERS
from attnprune.selectivity import SelectivityAnalyzer
from attnprune.selectivity.claims import (
    across_models,
    attention_entropy,
    bootstrap_weights,
    claims,
    collect,
    entropy_drop,
    entropy_slope,
    image_statistics,
    interval,
    resampled_means,
    scorer_gap,
    shallow_blocks,
    verdict,
)
from attnprune.selectivity.functional import spearman
from attnprune.selectivity.transition import claim_scorers, first_lead, informative_layers, transition_depth
from benchmarks.claims import table
from tests.conftest import tiny_vit


def one_hot_rows(b: int, h: int, t: int, prefix: int) -> torch.Tensor:
    """``[B, H, T, T]`` attention where every query attends to one patch token only."""
    attn = torch.zeros(b, h, t, t)
    attn[..., prefix] = 1.0
    return attn


def uniform_rows(b: int, h: int, t: int) -> torch.Tensor:
    return torch.full((b, h, t, t), 1.0 / t)


def test_attention_entropy_is_one_for_uniform_and_zero_for_one_hot_rows():
    cls, every = attention_entropy(uniform_rows(2, 3, 17), prefix=1)  # 16 patch tokens, renormalised
    torch.testing.assert_close(cls, torch.ones(2))
    torch.testing.assert_close(every, torch.ones(2))
    cls, every = attention_entropy(one_hot_rows(2, 3, 17, prefix=1), prefix=1)
    torch.testing.assert_close(cls, torch.zeros(2))
    torch.testing.assert_close(every, torch.zeros(2))


def test_attention_entropy_separates_the_class_query_from_all_queries():
    # class token: uniform over 4 patches (entropy 1); the 4 patch queries: one-hot (0); all 5 queries average 1/5
    attn = one_hot_rows(1, 2, 5, prefix=1)
    attn[:, :, 0] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    cls, every = attention_entropy(attn, prefix=1)
    torch.testing.assert_close(cls, torch.ones(1))
    torch.testing.assert_close(every, torch.full((1,), 0.2))
    # two patches with weight 1/2 each: entropy log 2 / log 4 = 1/2
    attn[:, :, 0] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])
    torch.testing.assert_close(attention_entropy(attn, prefix=1)[0], torch.full((1,), 0.5))
    assert math.isnan(attention_entropy(attn[..., 1:, 1:], prefix=0)[0].item())  # no class token


def test_entropy_drop_and_slope_on_attention_that_concentrates_with_depth():
    # six blocks: uniform (1), uniform, half on 2 of 4 patches (0.5), idem, one-hot (0), one-hot
    blocks = [uniform_rows(1, 1, 5), uniform_rows(1, 1, 5)]
    half = torch.zeros(1, 1, 5, 5)
    half[..., 1:3] = 0.5
    blocks += [half, half, one_hot_rows(1, 1, 5, 1), one_hot_rows(1, 1, 5, 1)]
    entropy = torch.stack([attention_entropy(a, prefix=1)[0] for a in blocks], -1)  # [1, 6]
    assert shallow_blocks(6) == 2 and shallow_blocks(8) == 3 and shallow_blocks(12) == 4
    torch.testing.assert_close(entropy_drop(entropy), torch.ones(1))  # (1 + 1) / 2 - (0 + 0) / 2
    torch.testing.assert_close(entropy_drop(entropy.flip(-1)), -torch.ones(1))  # diffuse deeper: reversed
    # least squares through (0, 1), (1, 1), (2, .5), (3, .5), (4, 0), (5, 0): sum (x - 2.5) y / sum (x - 2.5)^2
    torch.testing.assert_close(entropy_slope(entropy.double()), torch.tensor([-4 / 17.5], dtype=torch.float64))


def oracle_agreement(layers: list[tuple[int, int]]) -> torch.Tensor:
    """``[S=2, L]`` Spearman with an oracle of two scorers (0: attention, 1: l2-norm-like), from hand-built scores.

    ``layers[l] = (sign_attention, sign_other)``: +1 scores in the oracle's order, -1 reversed, 0 constant.
    """
    oracle = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    rows = []
    for signs in layers:
        scores = torch.stack([s * oracle if s else torch.ones(5) for s in signs])
        rows.append(spearman(scores, oracle))
    return torch.stack(rows, -1)


def test_scorer_gap_compares_the_best_of_each_family_over_the_shallow_third():
    attention = torch.tensor([True, False])
    # six blocks, shallow third = blocks 0-1: other scorer agrees (+1), attention reversed (-1) -> gap 2
    agreement = oracle_agreement([(-1, 1), (-1, 1), (1, -1), (1, -1), (1, -1), (1, -1)])
    gap, best_non, best_att = scorer_gap(agreement, attention)
    torch.testing.assert_close(gap, torch.tensor(2.0))
    assert (int(best_non), int(best_att)) == (1, 0)
    # constant attention scores (Spearman 0) in block 0, reversed in block 1: mean -1/2; other +1 -> gap 3/2
    agreement = oracle_agreement([(0, 1), (-1, 1), (1, 1), (1, 1), (1, 1), (1, 1)])
    torch.testing.assert_close(scorer_gap(agreement, attention)[0], torch.tensor(1.5))
    # eight blocks: the shallow third is blocks 0-2
    agreement = oracle_agreement([(-1, 1), (-1, 1), (1, -1)] + [(1, 1)] * 5)
    torch.testing.assert_close(scorer_gap(agreement, attention)[0], torch.tensor(2 / 3))
    # a second attention scorer that agrees perfectly is the best of its family: gap 1/3 - 1
    three = torch.cat([agreement, torch.ones(1, 8)])
    gap, best_non, best_att = scorer_gap(three, torch.tensor([True, False, True]))
    torch.testing.assert_close(gap, torch.tensor(1 / 3 - 1))
    assert (int(best_non), int(best_att)) == (1, 2)


def depths(agreement: torch.Tensor, attention: torch.Tensor, informative: torch.Tensor) -> list[int]:
    """The transition depth and the first lead, as ints."""
    return [
        int(transition_depth(agreement, attention, informative)),
        int(first_lead(agreement, attention, informative)),
    ]


def test_transition_depth_is_the_block_from_which_attention_leads():
    attention, every = torch.tensor([True, False]), torch.ones(6, dtype=torch.bool)
    # leads from block 3 on
    agreement = oracle_agreement([(-1, 1), (-1, 1), (0, 1), (1, -1), (1, 0), (1, -1)])
    assert depths(agreement, attention, every) == [3, 3]
    # leads in block 1, loses it in block 2, leads again from block 4: takes over at 4, first lead at 1
    agreement = oracle_agreement([(-1, 1), (1, -1), (-1, 1), (0, 0), (1, -1), (1, -1)])
    assert depths(agreement, attention, every) == [4, 1]
    # a tie (block 3: both constant) is not a lead; never leads: the depth (6) means none
    agreement = oracle_agreement([(-1, 1)] * 6)
    assert depths(agreement, attention, every) == [6, 6]
    # the last block of a class-token readout is skipped: everyone scores 0 there
    agreement = oracle_agreement([(-1, 1), (-1, 1), (1, -1), (1, -1), (1, -1), (0, 0)])
    assert depths(agreement, attention, every) == [6, 2]
    skip_last = torch.tensor([True] * 5 + [False])
    assert depths(agreement, attention, skip_last) == [2, 2]
    # batched over bootstrap samples
    both = torch.stack([agreement, oracle_agreement([(-1, 1)] * 6)])
    assert transition_depth(both, attention, skip_last).tolist() == [2, 6]
    assert first_lead(both, attention, skip_last).tolist() == [2, 6]


def test_informative_layers_follow_the_readout():
    assert informative_layers(tiny_vit()) == [True, True, True, False]
    assert informative_layers(tiny_vit(global_pool="avg")) == [True] * 4


def test_bootstrap_is_reproducible_from_its_seed():
    a, b, c = bootstrap_weights(7, 50, seed=3), bootstrap_weights(7, 50, seed=3), bootstrap_weights(7, 50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(1) == 7).all() and a.shape == (50, 7)
    values = torch.arange(14.0).view(7, 2)
    torch.testing.assert_close(
        resampled_means(values, torch.ones(1, 7, dtype=torch.float64)), values.mean(0)[None].double()
    )
    # a sample that drew image 0 three times and image 6 four times
    weights = torch.tensor([[3.0, 0, 0, 0, 0, 0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(
        resampled_means(values, weights),
        torch.tensor([[(0 * 3 + 12 * 4) / 7, (1 * 3 + 13 * 4) / 7]], dtype=torch.float64),
    )


def synthetic_stats(seed: int = 0, n: int = 40, m: int = 30) -> dict:
    """Per-image statistics of an 6-block model where (a) and (b) hold and attention takes over at block 3."""
    g = torch.Generator().manual_seed(seed)
    depth, scorers = 6, ["cls_attention", "l2_norm", "mean_attention"]
    entropy = torch.linspace(0.9, 0.4, depth) + 0.01 * torch.randn(n, depth, generator=g)
    agreement = torch.tensor(
        [
            [0.0, 0.1, 0.2, 0.5, 0.6, 0.7],  # cls_attention
            [0.4, 0.4, 0.3, 0.2, 0.1, 0.1],  # l2_norm
            [0.0, 0.0, 0.1, 0.3, 0.3, 0.3],  # mean_attention
        ]
    )
    spearmans = agreement + 0.02 * torch.randn(m, 3, depth, generator=g)
    return {
        "cls_entropy": entropy,
        "all_entropy": entropy + 0.05,
        "spearman": spearmans,
        "scorers": scorers,
        "informative": [True] * depth,
        "readout": "cls",
    }


def test_claims_on_synthetic_statistics_with_known_answers():
    result = claims(synthetic_stats(), bootstrap=200, seed=0)
    a, b, c = result["a"], result["b"], result["c"]
    # (a): shallow blocks 0-1 average 0.85, deep 4-5 0.45 (up to the noise)
    assert a["query"] == "cls" and a["statistic"] == pytest.approx(0.4, abs=0.01)
    assert a["ci"][0] < a["statistic"] < a["ci"][1] and a["holds"] and a["verdict"] == "holds"
    assert a["queries"]["all"]["statistic"] == pytest.approx(0.4, abs=0.01)
    # (b): l2_norm 0.4 against cls_attention 0.05
    assert b["statistic"] == pytest.approx(0.35, abs=0.02) and b["holds"]
    assert (b["best_non_attention"], b["best_attention"]) == ("l2_norm", "cls_attention")
    # (c): attention leads from block 3 in every sample
    assert c["depth"] == 3 and c["ci"] == [3, 3] and c["holds"] and c["distribution"] == {"3": 1.0}
    assert set(result) == {"a", "b", "c"} and isinstance(c["depth"], int)


def test_claims_reversed_and_reproducible():
    stats = synthetic_stats()
    stats["cls_entropy"] = stats["cls_entropy"].flip(-1)  # diffuse deeper
    stats["spearman"] = stats["spearman"][:, [1, 0, 2]]  # l2_norm's and cls_attention's agreements swapped
    first, again = claims(stats, bootstrap=100, seed=5), claims(stats, bootstrap=100, seed=5)
    assert first == again
    assert first != claims(stats, bootstrap=100, seed=6)
    assert first["a"]["verdict"] == "reversed" and not first["a"]["holds"]
    assert first["b"]["verdict"] == "reversed"
    # attention (the old l2_norm row) leads in blocks 0-2 only, then l2_norm (the old cls_attention row) does
    assert first["c"]["depth"] is None and first["c"]["first_lead"] == 0 and first["c"]["verdict"] == "reversed"
    assert first["c"]["ci"] == [None, None] and first["c"]["distribution"] == {"none": 1.0}
    assert "reversed" in table([{"model": "m", "paradigm": "p", "depth": 6, "claims": first}])


def test_verdicts_and_intervals():
    assert [verdict(0.1, 0.2), verdict(-0.2, -0.1), verdict(-0.1, 0.1)] == ["holds", "reversed", "unresolved"]
    lo, hi = interval(torch.arange(1001.0))
    assert (lo, hi) == pytest.approx((25.0, 975.0))


def test_image_statistics_agree_with_the_selectivity_analyzer(images):
    model = tiny_vit()
    scorers = claim_scorers(class_token=True)
    assert "random" not in scorers and {"cls_attention", "mean_attention", "l2_norm"} <= set(scorers)
    stats = image_statistics(model, images, scorers)
    analyzer = SelectivityAnalyzer(4, scorers=scorers)
    analyzer.update(model, images)
    results = analyzer.compute()
    torch.testing.assert_close(stats["cls_entropy"].mean(0).tolist(), results["cls_normalized_entropy"])
    torch.testing.assert_close(stats["all_entropy"].mean(0).tolist(), results["all_normalized_entropy"])
    for i, scorer in enumerate(scorers):
        got = stats["spearman"][:, i].mean(0).tolist()
        torch.testing.assert_close(got, results[f"reliability_spearman_{scorer}"], rtol=1e-4, atol=1e-5)
    headless = tiny_vit(class_token=False, global_pool="avg")
    scorers = claim_scorers(class_token=False)
    assert not any(SCORERS[s].needs_class_token for s in scorers)
    stats = image_statistics(headless, images, scorers)
    assert stats["spearman"].shape == (4, len(scorers), 4) and stats["cls_entropy"].isnan().all()


def test_collect_tops_up_the_oracle_to_the_same_statistics(images):
    model = tiny_vit()
    batches = [images[:3], images[3:], images.flip(0)]  # 8 images in batches of 3, 1 and 4
    full = collect(model, batches, num_images=7, oracle_images=5)
    assert full["images"] == 7 and full["all_entropy"].shape == (7, 4) and full["spearman"].shape[0] == 5
    first = collect(model, batches, num_images=7, oracle_images=2)
    rest = collect(model, batches, num_images=7, oracle_images=5, oracle_from=2)
    torch.testing.assert_close(torch.cat([first["spearman"], rest["spearman"]]), full["spearman"])
    torch.testing.assert_close(rest["cls_entropy"], full["cls_entropy"])
    assert full["readout"] == "cls" and full["informative"] == [True, True, True, False]


def test_across_models_compares_the_transition_intervals():
    def row(name: str, depth, ci, first):
        return {"model": name, "claims": {"c": {"depth": depth, "ci": ci, "first_lead": first}}}

    rows = [row("early", 2, [1, 3], 2), row("late", 5, [4, 6], 1), row("never", None, [None, None], None)]
    summary = across_models(rows)
    assert summary["depends_on_model"] and summary["depths"] == {"early": 2, "late": 5, "never": None}
    assert summary["pairs_apart"] == [["early", "late"], ["early", "never"], ["late", "never"]]
    assert summary["lead_not_kept"] == ["late"]
    assert not across_models([row("a", 2, [1, 4], 2), row("b", None, [3, None], 0)])["depends_on_model"]
