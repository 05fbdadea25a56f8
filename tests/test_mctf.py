"""MCTF (``Routing.mctf``, the reducer ``mctf`` and the block that runs it before attention) against the official
mlvlab/MCTF code, and by hand."""

import doctest

import pytest
import torch
from safetensors.torch import load_file
from timm.models.deit import VisionTransformerDistilled

from attnprune import Routing, count_flops, prune
from attnprune.errors import UserError
from attnprune.flops import reducer_flops
from attnprune.reduction import REDUCERS
from attnprune.reduction.mctf import TAU_INFO, TAU_SIZE, mctf, mctf_scores, two_way_merge
from attnprune.vit import forward_tokens
from tests.conftest import TINY, assert_matches_official, official_fixture_commit, tiny_vit
from tests.mctf_reference import CASES, FIXTURE, official_token_counts, seeded_images, seeded_vit
from tests.test_flops import measured_macs


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_official_implementation(case):
    spec = CASES[case]
    reference = load_file(FIXTURE)[case]
    model = seeded_vit(case)
    tokens = (spec["img_size"] // spec["patch_size"]) ** 2
    routing = Routing.mctf(spec["r"], spec["layers"], num_tokens=tokens)
    assert routing.token_counts(spec["depth"], tokens) == official_token_counts(case)
    with torch.no_grad():
        unpruned = model(seeded_images(case))
        ours = prune(model, routing)(seeded_images(case))
    assert_matches_official(ours, unpruned, reference)


def test_fixture_records_its_cases():
    assert official_fixture_commit(FIXTURE, CASES) == "2004da0cad3231fa74cbd60b6042b0bd133aacde"
    # the caps of the official code are exercised: half the tokens, at least 10 left, a block merging nothing
    assert official_token_counts("d4-w48-t49-r20") == [49, 49, 29, 15, 9]
    assert official_token_counts("d4-w32-t16-r4") == [16, 16, 12, 9, 9]


def _powers(tokens: int) -> torch.Tensor:
    """Token ``i`` holds ``2 ** i``: every sum of distinct tokens says which tokens it holds."""
    return (2.0 ** torch.arange(tokens, dtype=torch.float64))[None, :, None]


def test_two_way_merge_by_hand():
    # class token, then 6 patches: A = positions 2, 4, 6 and B = positions 1, 3, 5 (the class token is A's first)
    scores = torch.tensor([[[0.9, 0.1, 0.2], [0.3, 0.4, 0.8], [0.5, 0.6, 0.7]]], dtype=torch.float64)
    # r = 3: one A token, then two B tokens. A: position 2 has the best partner (0.9, position 1) and merges into it.
    # From B's side, on the A tokens left (4, 6): position 5 scores 0.8 with 4, position 3 0.6 with 6, position 1
    # 0.5 with 6: 5 merges into 4 and 3 into 6; position 1 (which holds 2) stays, after the A tokens
    merge_sum = two_way_merge(scores, 3, 1)
    assert merge_sum(_powers(7)).flatten().tolist() == [1.0, 16 + 32, 64 + 8, 2 + 4]
    # a B token that received an A token carries it along when it merges in turn: 2 -> 1, then 1 -> 4, and 5 -> 6
    scores = torch.tensor([[[0.9, 0.1, 0.2], [0.85, 0.3, 0.2], [0.1, 0.5, 0.6]]], dtype=torch.float64)
    assert two_way_merge(scores, 3, 1)(_powers(7)).flatten().tolist() == [1.0, 16 + 2 + 4, 64 + 32, 8]
    # r = 1 merges one B token only (r // 2 = 0 A tokens): position 1 into 2 (0.9); the B tokens left follow in
    # descending order of their best score (5: 0.6, 3: 0.5). Any leading dimensions merge along dimension -2
    merged = two_way_merge(scores, 1, 1)(_powers(7)[:, None].expand(-1, 2, -1, 3))
    assert merged.shape == (1, 2, 6, 3) and merged[0, 1, :, 0].tolist() == [1.0, 4 + 2, 16, 64, 32, 8]


def test_scores_by_hand():
    finder = doctest.DocTestFinder()
    assert all(doctest.DocTestRunner().run(test).failed == 0 for test in finder.find(mctf_scores, "mctf_scores"))
    # parallel tokens (similarity 1): the scores are the informativeness and size criteria alone
    x = torch.tensor([[[5.0, 0.0]] + [[1.0, 1.0]] * 4], dtype=torch.float64)
    received = torch.tensor([0.4, 0.1, 0.2, 0.1, 0.2], dtype=torch.float64)  # attention each token receives
    attention = received.expand(1, 2, 5, 5)  # every query of both heads attends alike
    size = torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0], dtype=torch.float64)[None, :, None]
    info = [(1 / c) / 10.0 for c in received.tolist()]  # 1 / received over its largest value, 1 / 0.1
    inverse_size = [1 / s for s in size.flatten().tolist()]  # largest inverse size: 1
    criteria = [
        (info[a] * info[b]) ** (1 / TAU_INFO) * (inverse_size[a] * inverse_size[b]) ** (1 / TAU_SIZE)
        for a in (2, 4)  # A: the even positions after the class token; B: the odd ones
        for b in (1, 3)
    ]
    assert mctf_scores(x, attention, size, 1).flatten().tolist() == pytest.approx(criteria, abs=1e-12)


def test_mctf_averages_by_attention_and_size_and_merges_the_attention():
    # class token and two patches: A = (class, position 2), B = (position 1); r = 1 merges 1 into 2
    x = torch.tensor([10.0, 1.0, 4.0], dtype=torch.float64)[None, :, None]
    size = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)[None, :, None]
    attention = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]], dtype=torch.float64).expand(
        1, 1, 3, 3
    )
    out, new_size, merged = mctf(x, size, 1, 1, metric=x, attention=attention)
    # weights: attention received (column means 0.8/3, 1.15/3, 1.05/3) times size over the largest size (3)
    w1, w2 = 1.15 / 3 / 3, 1.05 / 3
    assert out.flatten().tolist() == pytest.approx([10.0, (w1 * 1 + w2 * 4) / (w1 + w2)], abs=1e-12)
    assert new_size.flatten().tolist() == [1.0, 4.0]
    # the merged key receives both columns; the merged query's row averages rows 1 and 2 with the same weights
    row = [(w1 * 0.2 + w2 * 0.1) / (w1 + w2), (w1 * 0.8 + w2 * 0.9) / (w1 + w2)]
    assert merged.flatten().tolist() == pytest.approx([0.5, 0.5, *row], abs=1e-12)
    # without sizes every token counts once: the weights are the attention received alone
    out, new_size, _ = mctf(x, None, 1, 1, metric=x, attention=attention)
    assert out[0, 1, 0].item() == pytest.approx((1.15 * 1 + 1.05 * 4) / 2.2) and new_size.flatten().tolist() == [1, 2]


def test_reducer_record_and_merged_tokens_keep_their_membership():
    reducer = REDUCERS["mctf"]
    assert reducer.lookahead and reducer.averages and not reducer.takes_score and reducer.metric == "tokens"
    assert [reducer.max_removed(n) for n in (1, 2, 3, 64)] == [0, 1, 1, 32]
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    sources = []
    with torch.no_grad():
        _, size = forward_tokens(prune(model, Routing.mctf(12, (0, 2))), x, sources=sources)
    assert [s.shape[1] for s in sources] == [53, 53, 41, 41]
    # every token's size is the number of input tokens it holds; the class token holds itself only
    assert torch.equal(size[..., 0], (sources[-1] > 0).sum(dim=-1).to(size.dtype))
    assert torch.equal(sources[-1][:, 0] > 0, torch.nn.functional.one_hot(torch.tensor([0, 0]), 65).bool())


def test_prefix_tokens_are_kept_first_and_never_merged():
    distilled = VisionTransformerDistilled(**TINY).eval()
    sources = []
    with torch.no_grad():
        forward_tokens(prune(distilled, Routing.mctf(16, (1, 2, 3))), torch.randn(2, 3, 32, 32), sources=sources)
    assert [s.shape[1] for s in sources] == [66, 50, 34, 18]
    assert torch.equal(sources[-1][:, :2] > 0, torch.eye(66)[:2].bool().expand(2, -1, -1))


def test_preset_rules_yaml_round_trip_and_spec(tmp_path):
    routing = Routing.mctf(16, range(1, 12))
    assert [(rule.layer, rule.r, rule.reduce) for rule in routing.rules] == [(i, 16, "mctf") for i in range(1, 12)]
    assert routing.prop_attn and routing.name == "mctf-r16"
    assert routing.token_counts(12, 196) == [196, 196, *range(180, 19, -16)]  # DeiT-S: 196 -> 20 patch tokens
    path = tmp_path / "mctf.yaml"
    routing.to_yaml(path)
    assert Routing.from_yaml(path) == routing and "{layer: 11, r: 16, reduce: mctf}" in path.read_text()
    assert Routing.parse("mctf:r=16", 12) == routing
    assert Routing.parse("mctf:r=8,layers=3-6-9", 12) == Routing.mctf(8, (3, 6, 9))
    assert Routing.mctf(0, (1, 2)).rules == ()
    capped = Routing.mctf(20, (1, 2, 3), num_tokens=16)  # 16 -> 9 (10 tokens left with the class token), then none
    assert capped.token_counts(4, 16) == [16, 16, 9, 9, 9] and [rule.layer for rule in capped.rules] == [1]
    finder = doctest.DocTestFinder()
    assert all(doctest.DocTestRunner().run(test).failed == 0 for test in finder.find(Routing.mctf, "Routing.mctf"))


def test_count_flops_matches_torch_counter():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    for r, layers in ((8, (1, 2, 3)), (16, (0, 1)), (5, (2,))):
        routing = Routing.mctf(r, layers)
        assert count_flops(model, routing) == pytest.approx(measured_macs(prune(model, routing), x), rel=1e-2)
    # the counter sees the matrix products only; the rest is the weighted averaging of the tokens (width 48: a
    # product per token received, a division per token left) and of the attention rows (3 heads: a product per
    # entry of the key-merged rows, a division per entry of the merged ones)
    routing = Routing.mctf(8, (1, 2, 3))  # 65 -> 57 -> 49 -> 41 tokens, the class token included
    averaging = sum((t + t - 8) * 48 + 3 * (t + t - 8) * (t - 8) for t in (65, 57, 49))
    assert count_flops(model, routing) - averaging == measured_macs(prune(model, routing), x)
    assert count_flops(model, Routing.mctf(16, (1, 2, 3))) < 0.7 * count_flops(model, Routing())


def test_reducer_and_block_flops_by_hand():
    # 65 tokens (class + 64 patches) of width 48, 3 heads of 16; r = 16 leaves 49
    (plan,) = Routing.mctf(16, (1,)).resolve(4, 64)
    # non-prefix A (positions 2, 4, ..., 64: 32) against non-prefix B (1, 3, ..., 63: 32) at width 48
    assert reducer_flops(plan, 65, 48, 16) == 32 * 32 * 48 + (65 + 49) * 48
    model = tiny_vit()
    unpruned_block = 65 * (48 * 144 + 48 * 48) + 2 * 65 * 65 * 48 + 65 * 2 * 48 * 192
    mctf_block = (
        65 * 48 * 96  # queries and keys of the 65 tokens received
        + 65 * 65 * 48  # their attention logits
        + 3 * (65 + 49) * 49  # the probabilities merged
        + 49 * (48 * 48 + 48 * 48)  # values and projection of the 49 tokens left
        + 49 * 49 * 48  # probabilities times values
        + 49 * 2 * 48 * 192  # the MLP
    )
    drop_rest = 3 * (49 * (48 * 144 + 48 * 48) + 2 * 49 * 49 * 48 + 49 * 2 * 48 * 192)
    one_block = count_flops(model, Routing.mctf(16, (0,)))
    assert one_block - count_flops(model, Routing()) == (
        mctf_block + reducer_flops(plan, 65, 48, 16) + drop_rest - 4 * unpruned_block
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Routing.mctf(-1, (1, 2)), r"^MCTF's r must be an integer >= 0 \(tokens merged per layer\), got r=-1$"),
        (lambda: Routing.mctf(2.5, (1, 2)), r"^MCTF's r must be an integer >= 0 .*got r=2\.5$"),
        (lambda: Routing.mctf(True, (1, 2)), r"^MCTF's r must be an integer >= 0 .*got r=True$"),
        (lambda: Routing.mctf(8, (1,), num_tokens=0), r"^MCTF's num_tokens must be an integer >= 1, got num_tokens=0$"),
        (lambda: Routing.mctf(8, (1, 1)), r"^routing rule 1: field 'layer' repeats layer 1, already used by rule 0$"),
        (lambda: Routing.mctf(8, (-1,)), r"^routing rule 0: field 'layer' must be a block index >= 0, got -1$"),
        (lambda: Routing.parse("mctf:r=many", 12), r"^routing preset 'mctf:r=many': invalid literal"),
        (lambda: Routing.parse("mctf:keep=0.5", 12), r"^routing preset 'mctf:keep=0.5': unknown argument 'keep'"),
        (lambda: Routing.parse("mctf:r=8"), r"^routing preset 'mctf:r=8' needs the model's depth"),
        (
            lambda: Routing.mctf(8, (1, 12)).resolve(12, 196),
            r"^routing rule 1: field 'layer' is 12 but the model has 12 blocks \(0\.\.11\)$",
        ),
        (
            lambda: Routing.mctf(30, (1, 2)).resolve(4, 64),  # 64 -> 34: the second block cannot merge 30
            r"^routing rule 1: field 'r' merges too many tokens at layer 2: r=30, but with 34 non-prefix tokens "
            r"reaching it 'mctf' merges at most r=17$",
        ),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 1, "r": 8, "reduce": "mctf", "score": "cls_attention"}]}),
            r"^routing rule 0: field 'score' must be omitted for reduce 'mctf' \(it matches on tokens\), got "
            r"'cls_attention'$",
        ),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 1, "r": 8, "reduce": "mctf", "margin": 0.5}]}),
            r"^routing rule 0: field 'margin' is not read by reduce 'mctf'",
        ),
    ],
)
def test_bad_arguments_give_one_line_errors(make, message):
    with pytest.raises(UserError, match=message) as error:
        make()
    assert "\n" not in str(error.value)
