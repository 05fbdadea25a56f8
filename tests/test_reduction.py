import pytest
import torch

from attnprune.reduction import REDUCERS, drop, fuse, merge, register_reducer


def _tokens(batch=2, tokens=11, dim=6, seed=0):
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


def test_drop_keeps_top_scores_in_token_order():
    x = torch.arange(5.0)[None, :, None]  # prefix token 0, patches 1..4
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8]])
    out, size = drop(x, None, 2, 1, scores=scores)
    assert out.flatten().tolist() == [0.0, 2.0, 4.0]
    assert size is None


def test_fuse_is_score_weighted_average_of_dropped_tokens():
    x = torch.tensor([[[10.0], [1.0], [2.0], [3.0], [4.0]]])
    scores = torch.tensor([[0.1, 0.3, 0.5, 0.9]])  # keep patches 3 and 4 (values 3, 4); fuse 1 and 2
    out, size = fuse(x, None, 3, 1, scores=scores)
    assert torch.allclose(out.flatten(), torch.tensor([10.0, 3.0, 4.0, (0.1 * 1 + 0.3 * 2) / 0.4]))
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]


def test_merge_protects_prefix_conserves_size_and_averages():
    for prefix in (0, 1, 2, 5, 7):  # 7: prefix tokens at B positions 1, 3 and 5
        x = _tokens(tokens=prefix + 20)
        metric = _tokens(tokens=prefix + 20, dim=4, seed=1)
        size = torch.randint(1, 4, (2, prefix + 20, 1)).float()
        out, new_size = merge(x, size, 14, prefix, metric=metric)
        assert out.shape == (2, prefix + 14, 6)
        torch.testing.assert_close(out[:, :prefix], x[:, :prefix])
        assert torch.equal(new_size.sum(dim=1), size.sum(dim=1))
        # size-weighted sums are conserved: merging averages, it does not lose mass
        torch.testing.assert_close((out * new_size).sum(dim=1), (x * size).sum(dim=1))


def test_merge_picks_the_most_similar_pair():
    # tokens: A = positions 0, 2, 4; B = 1, 3. Token 4 duplicates token 1, so it is merged into it.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [1.0, 1.0], [0.0, 1.0]]])
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [5.0]]])
    out, size = merge(x, None, 4, 0, metric=metric)
    assert out.flatten().tolist() == [0.0, 2.0, 3.0, 3.0]  # A unmerged (0, 2), then B: (1 + 5) / 2, 3
    assert size.flatten().tolist() == [1.0, 1.0, 2.0, 1.0]


# ---------------------------------------------------------------------------------- token sizes, by hand
def test_drop_gathers_the_sizes_of_the_tokens_it_keeps():
    x = torch.arange(5.0)[None, :, None]  # prefix token 0, patches 1..4
    size = torch.tensor([[[1.0], [5.0], [6.0], [7.0], [8.0]]])
    out, new_size = drop(x, size, 2, 1, scores=torch.tensor([[0.1, 0.9, 0.2, 0.8]]))
    assert out.flatten().tolist() == [0.0, 2.0, 4.0]
    assert new_size.flatten().tolist() == [1.0, 6.0, 8.0]  # the prefix's size, then patches 2 and 4's


def test_fuse_weights_each_dropped_token_by_score_times_size():
    x = torch.tensor([[[10.0], [1.0], [2.0], [3.0], [4.0]]])
    size = torch.tensor([[[2.0], [3.0], [1.0], [2.0], [1.0]]])
    scores = torch.tensor([[0.1, 0.3, 0.5, 0.9]])  # keep patches 3 and 4; fuse 1 (size 3) and 2 (size 1)
    out, new_size = fuse(x, size, 3, 1, scores=scores)
    # (0.1 * 3 * 1 + 0.3 * 1 * 2) / (0.1 * 3 + 0.3 * 1) = 0.9 / 0.6; by score alone it would be 1.75, by size 1.25
    torch.testing.assert_close(out.flatten(), torch.tensor([10.0, 3.0, 4.0, 1.5]))
    assert new_size.flatten().tolist() == [2.0, 2.0, 1.0, 4.0]


def test_fuse_keeps_the_highest_scores_whatever_their_position():
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]]])
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.4]])  # keep patches 1 and 3 in token order; fuse 2, 4, 5
    out, size = fuse(x, None, 3, 1, scores=scores)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 3.0, (0.1 * 2 + 0.2 * 4 + 0.4 * 5) / 0.7]))
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 3.0]


def test_merge_averages_by_size_and_adds_the_sizes():
    # as test_merge_picks_the_most_similar_pair, with sizes: token 4 (value 5, size 3) merges into token 1 (1, size 2)
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [1.0, 1.0], [0.0, 1.0]]])
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [5.0]]])
    size = torch.tensor([[[1.0], [2.0], [4.0], [1.0], [3.0]]])
    out, new_size = merge(x, size, 4, 0, metric=metric)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 2.0, (2 * 1 + 3 * 5) / 5, 3.0]))
    assert new_size.flatten().tolist() == [1.0, 4.0, 5.0, 1.0]


def test_fuse_without_sizes_on_wide_tokens():
    x = torch.tensor([[[9.0, -9.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]])
    out, size = fuse(x, None, 2, 1, scores=torch.tensor([[0.2, 0.9, 0.6]]))  # keep patch 2; fuse 1 and 3
    torch.testing.assert_close(out[0], torch.tensor([[9.0, -9.0], [2.0, 20.0], [2.5, 25.0]]))  # (0.2 x1 + 0.6 x3) / 0.8
    assert size.flatten().tolist() == [1.0, 1.0, 2.0]


def test_reducers_are_registered_by_name_with_what_rules_need():
    assert {name: REDUCERS[name].fn for name in ("drop", "fuse", "merge")} == {
        "drop": drop,
        "fuse": fuse,
        "merge": merge,
    }
    assert [REDUCERS[n].takes_score for n in ("drop", "fuse", "merge")] == [True, True, False]
    assert REDUCERS["merge"].metric == "keys" and REDUCERS["merge"].max_removed(9) == 4
    assert (REDUCERS["fuse"].added, REDUCERS["fuse"].averages, REDUCERS["drop"].averages) == (1, True, False)
    with pytest.raises(ValueError, match="reducer 'drop' is registered twice"):
        register_reducer("drop")(drop)


def test_fuse_per_image_on_a_batch():
    # image 0: the case above; image 1 keeps patches 1 and 2 and fuses 3 (score 0.3, size 2) and 4 (0.1, size 1)
    x = torch.tensor([[10.0, 1.0, 2.0, 3.0, 4.0], [10.0, 1.0, 2.0, 3.0, 4.0]])[..., None] * torch.tensor([1.0, -2.0])
    size = torch.tensor([[2.0, 3.0, 1.0, 2.0, 1.0], [2.0, 3.0, 1.0, 2.0, 1.0]])[..., None]
    scores = torch.tensor([[0.1, 0.3, 0.5, 0.9], [0.9, 0.5, 0.3, 0.1]])
    out, new_size = fuse(x, size, 3, 1, scores=scores)
    fused = torch.tensor([1.5, (0.3 * 2 * 3 + 0.1 * 1 * 4) / 0.7])
    expected = torch.stack([torch.tensor([10.0, 3.0, 4.0, fused[0]]), torch.tensor([10.0, 1.0, 2.0, fused[1]])])
    torch.testing.assert_close(out, expected[..., None] * torch.tensor([1.0, -2.0]))
    assert new_size[..., 0].tolist() == [[2.0, 2.0, 1.0, 4.0], [2.0, 3.0, 1.0, 3.0]]


def test_fuse_averages_tiny_float64_scores():
    # weights far below float32's smallest normal (1e-38) still average in float64: the guard is the dtype's own
    x = torch.tensor([[[0.0], [1.0], [2.0], [4.0]]], dtype=torch.float64)
    scores = torch.tensor([[1e-100, 3e-100, 1.0]], dtype=torch.float64)
    out, _ = fuse(x, None, 2, 1, scores=scores)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 4.0, 1.75], dtype=torch.float64))


def test_merge_without_sizes_counts_every_token_once():
    x, metric = _tokens(tokens=21), _tokens(tokens=21, dim=4, seed=1)
    out, size = merge(x, None, 14, 1, metric=metric)
    reference, reference_size = merge(x, torch.ones(2, 21, 1), 14, 1, metric=metric)
    torch.testing.assert_close(out, reference)
    assert torch.equal(size, reference_size) and size.sum(dim=1).flatten().tolist() == [21.0, 21.0]


def test_merge_matches_each_a_token_against_every_b_token():
    # A = tokens 0, 2, 4, 6 and B = 1, 3, 5 (one-hot metrics): token 6 duplicates token 3, the only exact match
    e = torch.eye(4)
    metric = torch.stack([e[0], e[1], e[2], e[3], e[0] + e[2], e[1] + e[2], e[3]])[None]
    x = torch.arange(7.0)[None, :, None]
    out, size = merge(x, None, 6, 0, metric=metric)
    assert out.flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 4.5, 5.0]  # A unmerged, then B with 3 and 6 averaged
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 2.0, 1.0]
