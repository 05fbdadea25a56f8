import torch

from attnprune.reduction import drop, fuse, merge


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
    for prefix in (0, 1, 2, 5):
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
