import math

import pytest
import torch

from attnprune import SCORERS
from attnprune.scoring import ScoreContext

DESIGN_SCORERS = {
    "attention": {"cls_attention", "mean_attention", "cls_value"},
    "statistics": {"l2_norm", "l1_norm", "std", "max_abs", "kurtosis"},
    "similarity": {"cls_similarity", "distinctiveness", "redundancy"},
    "control": {"random"},
}


def _context(batch=2, tokens=7, heads=2, dim=4, prefix=1, with_attention=False):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(batch, heads, tokens, dim, generator=g), torch.randn(batch, heads, tokens, dim, generator=g)
    v = torch.randn(batch, heads, tokens, dim, generator=g)
    probs = ((q * dim**-0.5) @ k.transpose(-2, -1)).softmax(-1) if with_attention else None
    return ScoreContext(q, k, dim**-0.5, prefix, attention=probs, layer=3, seed=5, v=v), probs


def test_registry_has_the_design_scorers():
    assert {
        family: {n for n, s in SCORERS.items() if s.family == family} for family in DESIGN_SCORERS
    } == DESIGN_SCORERS


def test_statistics_by_hand():
    x = torch.tensor([[[9.0, 9.0, 9.0, 9.0], [3.0, -4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    ctx = ScoreContext(None, None, 1.0, num_prefix=1)
    assert SCORERS["l2_norm"](x, ctx).tolist() == [[5.0, 2.0]]
    assert SCORERS["l1_norm"](x, ctx).tolist() == [[7.0, 4.0]]
    assert SCORERS["max_abs"](x, ctx).tolist() == [[4.0, 1.0]]
    # token [3, -4, 0, 0]: mean -1/4, population std sqrt(24.6875 / 4)
    assert SCORERS["std"](x, ctx)[0, 0].item() == pytest.approx(math.sqrt((3.25**2 + 3.75**2 + 2 * 0.25**2) / 4))
    # kurtosis of [1, -1, 1, -1] is 1 (the minimum); of [2, 0, 0, 0] it is 2.333...
    y = torch.tensor([[[0.0] * 4, [1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(SCORERS["kurtosis"](y, ctx), torch.tensor([[1.0, (1.5**4 + 3 * 0.5**4) / 4 / 0.75**2]]))


def test_similarity_by_hand():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]])
    ctx = ScoreContext(None, None, 1.0, num_prefix=1)
    torch.testing.assert_close(SCORERS["cls_similarity"](x, ctx), torch.tensor([[1.0, 0.5, 0.0, 0.5]]))
    # patch tokens 2 and 4 are duplicates (redundancy 0); token 1's closest neighbour is orthogonal (1)
    torch.testing.assert_close(SCORERS["redundancy"](x, ctx), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    # mean patch token is (0, 0.5): cosine 0 to tokens 1 and 3, 1 to tokens 2 and 4
    torch.testing.assert_close(SCORERS["distinctiveness"](x, ctx), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    # a lone patch token has no other token to duplicate: redundancy 2, as if opposite to everything
    assert SCORERS["redundancy"](x[:, :2], ctx).tolist() == [[2.0]]


def test_cls_attention_from_class_query_equals_full_matrix():
    ctx, _ = _context()
    _, probs = _context(with_attention=True)
    x = torch.zeros(2, 7, 4)
    torch.testing.assert_close(SCORERS["cls_attention"](x, ctx), probs[:, :, 0, 1:].mean(1))
    with_bias = ScoreContext(ctx.q, ctx.k, ctx.scale, 1, bias=torch.zeros(2, 1, 1, 7).fill_(math.log(2.0)))
    torch.testing.assert_close(with_bias.cls_attention, ctx.cls_attention)  # a constant bias cancels in softmax


def test_mean_attention_needs_materialised_attention():
    ctx, _ = _context()
    message = "^attention probabilities were not materialised; register the scorer with needs_attention=True$"
    with pytest.raises(RuntimeError, match=message):
        SCORERS["mean_attention"](torch.zeros(2, 7, 4), ctx)
    ctx, probs = _context(with_attention=True)
    torch.testing.assert_close(SCORERS["mean_attention"](torch.zeros(2, 7, 4), ctx), probs.mean((1, 2))[:, 1:])


def test_random_is_seeded_and_identical_across_the_batch():
    ctx, _ = _context()
    a = SCORERS["random"](torch.zeros(3, 7, 4), ctx)
    assert torch.equal(a, SCORERS["random"](torch.zeros(3, 7, 4), ctx))
    assert torch.equal(a[0], a[2])
    other = ScoreContext(ctx.q, ctx.k, ctx.scale, 1, layer=4, seed=5)
    assert not torch.equal(a, SCORERS["random"](torch.zeros(3, 7, 4), other))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_is_non_negative_with_one_score_per_patch(name):
    ctx, _ = _context(with_attention=True, prefix=2)
    scores = SCORERS[name](torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(1)), ctx)
    assert scores.shape == (2, 5)
    assert (scores >= 0).all()


def test_cls_attention_is_the_class_row_under_a_non_constant_bias():
    ctx, _ = _context()
    sizes = torch.tensor([[1.0, 2.0, 1.0, 5.0, 1.0, 3.0, 1.0], [1.0, 1.0, 4.0, 1.0, 2.0, 1.0, 7.0]])
    bias = sizes.log().view(2, 1, 1, 7)  # proportional attention: log of each key token's size
    # the explicit T x T matrix with the bias on every row, then its class-token row
    full = ((ctx.q * ctx.scale) @ ctx.k.transpose(-2, -1) + bias).softmax(dim=-1)
    biased = ScoreContext(ctx.q, ctx.k, ctx.scale, 1, bias=bias)
    torch.testing.assert_close(biased.cls_attention, full[:, :, 0])
    assert (biased.cls_attention - ctx.cls_attention).abs().max() > 0.05  # the bias does change the answer
    torch.testing.assert_close(SCORERS["cls_attention"](torch.zeros(2, 7, 4), biased), full[:, :, 0, 1:].mean(1))
    # one image, one head: still [B, H, T]
    single = ScoreContext(ctx.q[:1, :1], ctx.k[:1, :1], ctx.scale, 1, bias=bias[:1])
    torch.testing.assert_close(single.cls_attention, full[:1, :1, 0])


def test_cls_attention_reads_the_class_row_of_a_materialised_matrix():
    q = torch.zeros(1, 1, 3, 1)
    probs = torch.tensor([[[[0.2, 0.3, 0.5], [0.6, 0.1, 0.3], [0.1, 0.8, 0.1]]]])  # rows: queries; not symmetric
    ctx = ScoreContext(q, q, 1.0, 1, attention=probs)
    torch.testing.assert_close(ctx.cls_attention, torch.tensor([[[0.2, 0.3, 0.5]]]))  # the column is [0.2, 0.6, 0.1]
    torch.testing.assert_close(SCORERS["cls_attention"](torch.zeros(1, 3, 1), ctx), torch.tensor([[0.3, 0.5]]))


def test_scorer_flops_and_requirements_by_hand():
    # 65 tokens of width 48 in 3 heads: one multiply-accumulate per channel and token is 65 * 48 = 3120
    flops = {name: scorer.flops(65, 48, 3) for name, scorer in SCORERS.items()}
    assert flops == {
        "cls_attention": 3120 + 3 * 65,  # the class query against every key, then the head average
        "cls_value": 2 * 3120 + 3 * 65 + 65,  # cls_attention's, the value norms, their product
        "mean_attention": 3 * 65 * 65,  # the column means of every head's attention matrix
        "l2_norm": 3120,
        "l1_norm": 3120,
        "std": 2 * 3120,
        "max_abs": 3120,
        "kurtosis": 4 * 3120,
        "cls_similarity": 2 * 3120,
        "distinctiveness": 3 * 3120,
        "redundancy": 65 * 65 * 48 + 3120,  # every pair's cosine
        "random": 0,
    }
    assert {name for name, s in SCORERS.items() if s.needs_attention} == {"mean_attention"}
    class_token = {name for name, s in SCORERS.items() if s.needs_class_token}
    assert class_token == {"cls_attention", "cls_similarity", "cls_value"}


def test_a_scorer_name_is_registered_once():
    from attnprune.scoring import register_scorer

    with pytest.raises(ValueError, match="^scorer 'l2_norm' is registered twice$"):
        register_scorer("l2_norm", "statistics", flops=lambda t, c, h: 0)(lambda x, ctx: x)
    assert SCORERS["l2_norm"].fn.__name__ == "l2_norm"


def test_register_scorer_records_every_field():
    from attnprune.scoring import register_scorer

    def first_channel(x, ctx):
        return x[:, ctx.num_prefix :, 0]

    try:
        assert register_scorer("_first_channel", "statistics", flops=lambda t, c, h: t)(first_channel) is first_channel
        scorer = SCORERS["_first_channel"]
        assert (scorer.name, scorer.family, scorer.fn) == ("_first_channel", "statistics", first_channel)
        assert (scorer.flops(65, 48, 3), scorer.needs_attention, scorer.needs_class_token) == (65, False, False)
        x = torch.tensor([[[9.0, 0.0], [1.0, 5.0], [2.0, 6.0]]])
        assert scorer(x, ScoreContext(None, None, 1.0, num_prefix=1)).tolist() == [[1.0, 2.0]]
        register_scorer("_needs_both", "attention", lambda t, c, h: 0, needs_attention=True, needs_class_token=True)(
            first_channel
        )
        assert (SCORERS["_needs_both"].needs_attention, SCORERS["_needs_both"].needs_class_token) == (True, True)
    finally:
        SCORERS.pop("_first_channel", None)
        SCORERS.pop("_needs_both", None)


def test_random_scores_come_from_the_documented_seed():
    ctx, _ = _context()  # seed 5, layer 3: the generator is seeded with 5 * 1_000_003 + 3
    expected = torch.rand(6, generator=torch.Generator().manual_seed(5_000_018))
    torch.testing.assert_close(SCORERS["random"](torch.zeros(2, 7, 4), ctx), expected.expand(2, 6))
    # defaults: seed 0, layer 0; the scores take the tokens' dtype
    scores = SCORERS["random"](torch.zeros(3, 5, 4, dtype=torch.float64), ScoreContext(None, None, 1.0, 1))
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, torch.rand(4, generator=torch.Generator().manual_seed(0)).double().expand(3, 4))


def test_key_metric_is_the_keys_averaged_over_heads():
    k = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 0.0], [-1.0, 2.0]]]])  # [B=1, H=2, T=2, d=2]
    ctx = ScoreContext(k, k, 1.0, 1)
    torch.testing.assert_close(ctx.key_metric, torch.tensor([[[3.0, 1.0], [1.0, 3.0]]]))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_keeps_the_tokens_device(name):
    """On the shape-only meta device, as a stand-in for CUDA: a tensor a scorer makes on the CPU would not mix."""
    q, k = torch.empty(2, 2, 7, 4, device="meta"), torch.empty(2, 2, 7, 4, device="meta")
    ctx = ScoreContext(q, k, 0.5, 2, attention=torch.empty(2, 2, 7, 7, device="meta"), layer=3, seed=5, v=k)
    scores = SCORERS[name](torch.empty(2, 7, 4, device="meta"), ctx)
    assert scores.device.type == "meta" and scores.shape == (2, 5)
