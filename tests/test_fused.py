"""The lean (CUDA) reducers and proportional attention against the PyTorch reference, on the CPU."""

import random

import pytest
import torch
import torch.nn.functional as F

from attnprune import Routing, fused, prune
from attnprune.reduction import REDUCERS
from tests.conftest import random_routing, tiny_vit
from tests.test_vit import MODEL_VARIANTS, _variant


def _inputs(prefix: int, tokens: int = 20, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, prefix + tokens, 6, generator=g, dtype=dtype)
    size = torch.randint(1, 5, (3, prefix + tokens, 1), generator=g).to(dtype)
    scores = torch.rand(3, tokens, generator=g, dtype=dtype)
    metric = torch.randn(3, prefix + tokens, 4, generator=g, dtype=dtype)
    return x, size, scores, metric


@pytest.mark.parametrize("name", sorted(fused.FUSED_REDUCERS))
@pytest.mark.parametrize("prefix", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("with_size", [False, True])
def test_lean_reducer_equals_reference(name, prefix, with_size):
    x, size, scores, metric = _inputs(prefix)
    size = size if with_size else None
    for n_out in (10, 13, 19) if name != "merge" else (10, 13, 19, 20):
        expected = REDUCERS[name](x, size, n_out, prefix, scores=scores, metric=metric)
        got = fused.FUSED_REDUCERS[name](x, size, n_out, prefix, scores=scores, metric=metric)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        if expected[1] is None:
            assert got[1] is None
        else:
            assert torch.equal(got[1], expected[1])  # sizes are counts: exactly equal


def test_lean_reducers_keep_float64():
    x, size, scores, metric = _inputs(1, dtype=torch.float64)
    for name in fused.FUSED_REDUCERS:
        expected = REDUCERS[name](x, size, 12, 1, scores=scores, metric=metric)
        got = fused.FUSED_REDUCERS[name](x, size, 12, 1, scores=scores, metric=metric)
        assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
        torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)


def test_lean_fuse_by_hand_with_sizes():
    # as tests/test_reduction.py: keep patches 3 and 4; fuse 1 (size 3) and 2 (size 1) with scores 0.1 and 0.3
    x = torch.tensor([[[10.0], [1.0], [2.0], [3.0], [4.0]]])
    size = torch.tensor([[[2.0], [3.0], [1.0], [2.0], [1.0]]])
    out, new_size = fused.fuse(x, size, 3, 1, scores=torch.tensor([[0.1, 0.3, 0.5, 0.9]]))
    torch.testing.assert_close(out.flatten(), torch.tensor([10.0, 3.0, 4.0, 1.5]))
    assert new_size.flatten().tolist() == [2.0, 2.0, 1.0, 4.0]


def test_lean_merge_by_hand():
    # token 4 (value 5, size 3) merges into token 1 (value 1, size 2): (2 * 1 + 3 * 5) / 5
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [1.0, 1.0], [0.0, 1.0]]])
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [5.0]]])
    size = torch.tensor([[[1.0], [2.0], [4.0], [1.0], [3.0]]])
    out, new_size = fused.merge(x, size, 4, 0, metric=metric)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 2.0, 3.4, 3.0]))
    assert new_size.flatten().tolist() == [1.0, 4.0, 5.0, 1.0]


def test_lean_merge_sums_several_sources_into_one_token():
    # tokens 2, 4 and 6 (set A) are closest to token 1 (set B), token 0 less close to token 3: r = 3 merges 2, 4 and
    # 6 into 1 (one scatter, several sources into one destination)
    metric = torch.tensor([[[1.0, 2.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.05], [0.0, 1.0], [1.0, 0.0]]])
    x = torch.arange(7.0)[None, :, None]
    for merge in (REDUCERS["merge"], fused.merge):
        out, size = merge(x, None, 4, 0, metric=metric)
        assert out.flatten().tolist() == [0.0, 3.25, 3.0, 5.0]  # (1 + 2 + 4 + 6) / 4
        assert size.flatten().tolist() == [1.0, 4.0, 1.0, 1.0]


@pytest.mark.parametrize("heads,head_dim", [(2, 8), (3, 5), (1, 64)])
def test_attention_with_bias_equals_masked_sdpa(heads, head_dim):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 9, head_dim, generator=g) for _ in range(3))
    bias = torch.randint(1, 6, (2, 1, 1, 9), generator=g).float().log()
    scale = head_dim**-0.5
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    got = fused.attention_with_bias(q, k, v, bias, scale)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dispatch():
    """``auto`` is the reference (the lean path measured slower on an H200); ``fused`` forces the lean one."""
    assert fused.get_impl() == "auto"
    assert fused.reducer_for("merge") is REDUCERS["merge"]
    assert not fused.lean_attention(torch.empty(1, dtype=torch.bfloat16))
    with fused.use_impl("fused"):
        assert fused.reducer_for("drop") is fused.drop
        assert fused.reducer_for("absorb") is REDUCERS["absorb"]  # no lean version: the reference
        assert fused.lean_attention(torch.empty(1, dtype=torch.bfloat16))
        with fused.use_impl("reference"):
            assert fused.reducer_for("drop") is REDUCERS["drop"]
        assert fused.get_impl() == "fused"
    assert fused.get_impl() == "auto"
    with pytest.raises(ValueError, match="reduction impl"):
        fused.set_impl("triton")


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_pruned_logits_equal_reference(variant, images):
    model = _variant(variant)
    rng = random.Random(variant)
    routings = [random_routing(rng, len(model.blocks), class_token=model.has_class_token) for _ in range(5)]
    routings.append(Routing.tome(8, len(model.blocks)))
    if model.has_class_token:
        routings += [Routing.evit(keep=0.7, layers=(1, 2, 3)), Routing.topk_attention(keep=0.8, layers=(0, 2))]
    with torch.no_grad():
        for routing in routings:
            prune(model, routing)
            expected = model(images)
            with fused.use_impl("fused"):
                got = model(images)
            assert (got - expected).abs().max() <= 1e-5, routing


def test_tome_with_lean_merge_still_equals_official_implementation():
    from safetensors.torch import load_file

    from attnprune.vit import num_patch_tokens
    from tests.tome_reference import CASES, FIXTURE, seeded_images, seeded_model

    name = "deit_tiny_distilled_patch16_224"
    model = seeded_model(name)
    routing = Routing.tome(CASES[name], len(model.blocks), num_tokens=num_patch_tokens(model))
    with torch.no_grad(), fused.use_impl("fused"):
        ours = prune(model, routing)(seeded_images())
    assert (ours - load_file(FIXTURE)[name]).abs().max() <= 1e-4


def test_lean_path_in_bfloat16_stays_close_to_the_reference(images):
    model = tiny_vit().to(torch.bfloat16)
    x = images.to(torch.bfloat16)
    with torch.no_grad():
        for routing in (Routing.tome(6, 4), Routing.evit(keep=0.7, layers=(1, 2, 3))):
            prune(model, routing)
            expected = model(x).float()
            with fused.use_impl("fused"):
                got = model(x).float()
            assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
