import random
import re

import pytest
import timm
import torch

from attnprune import Routing, prune, unprune
from tests.conftest import random_routing, tiny_vit

UNPRUNED_MODELS = {
    "deit_tiny": lambda: timm.create_model("deit_tiny_patch16_224").eval(),
    "deit_tiny_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224").eval(),
    "mae_style_avg_fc_norm": lambda: tiny_vit(global_pool="avg", fc_norm=True),
    "dino_features": lambda: tiny_vit(num_classes=0),
    "registers": lambda: tiny_vit(reg_tokens=4),
    "layer_scale_qk_norm": lambda: tiny_vit(init_values=0.1, qk_norm=True),
    "no_class_token_avg": lambda: tiny_vit(class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("name", sorted(UNPRUNED_MODELS))
def test_without_routing_equals_timm(name):
    model = UNPRUNED_MODELS[name]()
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        for routing in (None, Routing()):
            assert (prune(model, routing)(x) - reference).abs().max() <= 1e-5
        # A routing that keeps every token goes through our own block forward, and still equals timm.
        keep_all = Routing.from_dict({"rules": [{"layer": 0, "score": "l2_norm", "keep": 1.0}]})
        assert (prune(model, keep_all)(x) - reference).abs().max() <= 1e-5


MODEL_VARIANTS = {
    "cls": {},
    "distilled": None,
    "registers_avg_fc_norm": {"reg_tokens": 2, "global_pool": "avg", "fc_norm": True},
    "no_class_token": {"class_token": False, "global_pool": "avg"},
    "layer_scale_qk_norm_features": {"init_values": 0.1, "qk_norm": True, "num_classes": 0},
}


def _variant(name: str) -> torch.nn.Module:
    if MODEL_VARIANTS[name] is None:
        from timm.models.deit import VisionTransformerDistilled

        from tests.conftest import TINY

        torch.manual_seed(0)
        return VisionTransformerDistilled(**TINY).eval()
    return tiny_vit(**MODEL_VARIANTS[name])


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_batch_equals_one_at_a_time_and_runs_are_deterministic(variant, images):
    model = _variant(variant)
    rng = random.Random(variant)
    for _ in range(6):
        routing = random_routing(rng, len(model.blocks), class_token=model.has_class_token)
        prune(model, routing)
        with torch.no_grad():
            batch = model(images)
            single = torch.cat([model(image[None]) for image in images])
            again = model(images)
        assert torch.isfinite(batch).all()
        assert (batch - single).abs().max() <= 1e-4, routing
        assert torch.equal(batch, again), routing


def test_pruning_changes_the_output_and_unprune_restores(images):
    model = tiny_vit()
    with torch.no_grad():
        reference = model(images)
        pruned = prune(model, Routing.topk_attention(0.5, (1, 2)))(images)
        assert (pruned - reference).abs().max() > 1e-3
        assert torch.equal(unprune(model)(images), reference)
    assert "forward" not in model.__dict__ and not hasattr(model, "routing")


def test_prefix_tokens_survive_and_stay_in_front(images):
    model = tiny_vit(reg_tokens=3)
    prune(model, Routing.from_dict({"rules": [{"layer": 0, "score": "l2_norm", "keep": 4}]}))
    original = model.blocks[1].forward
    seen = {}

    def spy(x):
        seen["x"] = x
        return original(x)

    model.blocks[1].forward = spy
    with torch.no_grad():
        model(images)
        reference = model._pos_embed(model.patch_embed(images))
    assert seen["x"].shape[1] == 4 + 4
    # the class and register tokens were carried through block 0 unpruned: same as running block 0 alone
    block0 = model.blocks[0](reference)
    torch.testing.assert_close(seen["x"][:, :4], block0[:, :4])


def test_routing_seed_changes_random_scorer(images):
    model = tiny_vit()
    with torch.no_grad():
        a = prune(model, Routing.random(0.5, (1,), seed=0))(images)
        b = prune(model, Routing.random(0.5, (1,), seed=1))(images)
    assert (a - b).abs().max() > 1e-4


def test_other_input_size_resolves_its_own_counts():
    model = tiny_vit(dynamic_img_size=True)
    prune(model, Routing.topk_attention(0.5, (1,)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 10)
    # 144 patches: layer 1 keeps 72 (a cached 64-patch plan would have failed to gather)
    assert model.routing.token_counts(4, 144) == [144, 144, 72, 72, 72]


def test_training_mode_backpropagates(images):
    model = tiny_vit(drop_path_rate=0.1).train()
    prune(
        model,
        Routing.from_dict(
            {
                "rules": [
                    {"layer": 1, "score": "mean_attention", "keep": 0.5, "reduce": "fuse"},
                    {"layer": 2, "r": 8, "reduce": "merge"},
                ]
            }
        ),
    )
    model(images).sum().backward()
    assert model.blocks[3].mlp.fc1.weight.grad.abs().sum() > 0


def test_sources_track_which_input_tokens_each_token_stands_for(images):
    from attnprune.vit import forward_tokens

    model = prune(
        tiny_vit(),
        Routing.from_dict(
            {
                "rules": [
                    {"layer": 0, "score": "l2_norm", "keep": 48, "reduce": "drop"},
                    {"layer": 1, "r": 8, "reduce": "merge"},
                    {"layer": 2, "score": "cls_attention", "keep": 20, "reduce": "fuse"},
                ]
            }
        ),
    )
    sources = []
    with torch.no_grad():
        _, size = forward_tokens(model, images, sources=sources)
    membership = [s > 0 for s in sources]
    assert [m.shape[1] for m in membership] == [49, 41, 22, 22]
    assert membership[0].sum(dim=1).amax() == 1 and (membership[0].sum(dim=1) == 0).sum(dim=1).tolist() == [16] * 4
    assert membership[1].sum(dim=(1, 2)).tolist() == [49] * 4  # merging loses no input token
    assert torch.equal(membership[3].sum(dim=2).float(), size[..., 0])  # a token's size counts its input patches
    assert membership[3][:, 0, 0].all() and membership[3][:, 0].sum(dim=1).tolist() == [1] * 4  # CLS stays itself


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_average_pooling_is_weighted_by_token_size(pool):
    from attnprune.vit import head

    model = tiny_vit(global_pool=pool, fc_norm=False, num_classes=0)  # head and fc_norm are identities: head = pool
    x = torch.tensor([[[100.0, 0.0], [1.0, 2.0], [4.0, -1.0]]])  # class token (not pooled), two patch tokens
    size = torch.tensor([[[1.0], [1.0], [3.0]]])  # the second patch token stands for 3 patches
    weighted = torch.tensor([[(1.0 + 3 * 4.0) / 4, (2.0 - 3 * 1.0) / 4]])  # unweighted would be [2.5, 0.5]
    expected = weighted if pool == "avg" else 0.5 * (weighted + torch.tensor([[4.0, 2.0]]))
    torch.testing.assert_close(head(model, x, size), expected)
    torch.testing.assert_close(head(model, x, None), model.forward_head(x))  # all sizes 1: timm's own pooling


def test_merged_avg_pool_model_pools_by_size(images):
    """End to end on an MAE-style model: the pruned forward equals size-weighted pooling of its own tokens."""
    from attnprune.vit import forward_tokens

    model = prune(tiny_vit(global_pool="avg", fc_norm=True), Routing.tome(8, 4))
    with torch.no_grad():
        tokens, size = forward_tokens(model, images)
        patches, weights = tokens[:, 1:], size[:, 1:]
        assert weights.amax() > 1  # merging made tokens of several patches
        pooled = (patches * weights).sum(dim=1) / weights.sum(dim=1)
        torch.testing.assert_close(model(images), model.head(model.fc_norm(pooled)))
        assert (model(images) - model.head(model.fc_norm(patches.mean(dim=1)))).abs().max() > 1e-3


def test_pruned_forward_features_are_the_pruned_tokens(images):
    """``model.forward_features`` of a pruned model returns forward_tokens' normed tokens (1 + 32 after keep 32)."""
    from attnprune.vit import forward_tokens

    model = prune(tiny_vit(), Routing.from_dict({"rules": [{"layer": 1, "score": "l2_norm", "keep": 32}]}))
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (4, 33, 48)
        assert torch.equal(features, forward_tokens(model, images)[0])


def test_unprune_removes_everything_prune_added(images):
    """After prune then unprune, the model's attributes are exactly those it had before."""
    model = tiny_vit()
    before = set(vars(model))
    prune(model, Routing.topk_attention(0.5, (1,)))
    assert {"forward", "forward_features", "routing", "_attnprune_plans"} <= set(vars(model))
    assert set(vars(unprune(model))) == before


def test_forward_tokens_of_an_unpruned_model_is_timms_forward_features(images):
    """On a model never pruned: timm's normed tokens, no sizes, and every block's output (timm's blocks in turn)."""
    from attnprune.vit import forward_tokens

    model = tiny_vit()
    outputs = {}
    with torch.no_grad():
        tokens, size = forward_tokens(model, images, block_outputs=outputs)
        torch.testing.assert_close(tokens, model.forward_features(images), rtol=0, atol=1e-6)
        assert size is None
        assert sorted(outputs) == [0, 1, 2, 3]
        x = model._pos_embed(model.patch_embed(images))
        for i, block in enumerate(model.blocks):
            x = block(x)
            torch.testing.assert_close(outputs[i], x, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.norm(outputs[3]), tokens, rtol=0, atol=0)


def test_sources_follow_the_tokens_dtype_and_device():
    """The membership tensors are made in the tokens' dtype and on their device (meta stands in for a GPU)."""
    from attnprune.vit import forward_tokens

    rules = [{"layer": 1, "score": "l2_norm", "keep": 48}, {"layer": 2, "r": 8, "reduce": "merge"}]
    routing = Routing.from_dict({"rules": rules})
    model = prune(tiny_vit().double(), routing)
    sources = []
    with torch.no_grad():
        forward_tokens(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), sources=sources)
    assert [s.dtype for s in sources] == [torch.float64] * 4 and [s.shape[1] for s in sources] == [65, 49, 41, 41]
    assert torch.equal(sources[0], torch.eye(65, dtype=torch.float64).expand(2, -1, -1))  # block 0 reduces nothing
    model = prune(tiny_vit().to("meta"), routing)
    sources = []
    tokens, _ = forward_tokens(model, torch.empty(2, 3, 32, 32, device="meta"), sources=sources)
    assert tokens.shape == (2, 41, 48) and [s.device.type for s in sources] == ["meta"] * 4


def test_num_patch_tokens_counts_the_grid_of_any_size():
    """Patch counts for 4x8 patches: 8 x 4 at the model's 32 px, 3 x 2 at (12, 16), 6 x 3 at 24 (int or list)."""
    from attnprune.vit import num_patch_tokens

    model = tiny_vit(patch_size=(4, 8))
    assert num_patch_tokens(model) == 32
    assert num_patch_tokens(model, (12, 16)) == 6
    assert num_patch_tokens(model, [12, 16]) == 6
    assert num_patch_tokens(model, 24) == 18
    assert num_patch_tokens(model, (32, 16)) == 16


@pytest.mark.parametrize("img_size", [(32, 32, 32), (32, 32.0), (True, 32), True, "ab", 32.0])
def test_num_patch_tokens_refuses_what_is_not_a_size(img_size):
    """Anything but an int or an (h, w) pair of ints (bools excluded) is a TypeError naming the value."""
    from attnprune.vit import num_patch_tokens

    message = re.escape(f"img_size must be an int or an (h, w) pair of ints, got {img_size!r}")
    with pytest.raises(TypeError, match=f"^{message}$"):
        num_patch_tokens(tiny_vit(), img_size)


@pytest.mark.parametrize("img_size", [(32, 30), (30, 32), (0, 32), (32, 0), (-4, 32), 0])
def test_num_patch_tokens_refuses_sizes_that_do_not_fit(img_size):
    """Sizes not positive or (without dynamic padding) not multiples of the 4 px patch are a ValueError."""
    from attnprune.vit import num_patch_tokens

    message = re.escape(
        f"img_size {img_size!r} does not fit the model: expected positive multiples of its patch size (4, 4)"
    )
    with pytest.raises(ValueError, match=f"^{message}$"):
        num_patch_tokens(tiny_vit(), img_size)
    model = tiny_vit()
    del model.patch_embed.dynamic_img_pad  # a patch embedding without the attribute does not pad
    with pytest.raises(ValueError, match=f"^{message}$"):
        num_patch_tokens(model, img_size)


def test_num_patch_tokens_with_dynamic_padding_rounds_up():
    """With dynamic padding any positive size fits: the grid is rounded up (30 px -> 8 patches, 1 px -> 1)."""
    from attnprune.vit import num_patch_tokens

    model = tiny_vit(dynamic_img_pad=True)
    assert num_patch_tokens(model, 30) == 64
    assert num_patch_tokens(model, (1, 30)) == 8
    assert num_patch_tokens(model, (30, 1)) == 8
    with pytest.raises(ValueError, match=r"^img_size \(0, 30\) does not fit the model: "):
        num_patch_tokens(model, (0, 30))


def test_prune_refuses_models_it_cannot_prune(images):
    """Not a ViT, a non-standard block at or after the first rule, a class-token scorer without a class token."""
    from timm.models.vision_transformer import ResPostBlock

    routing = Routing.topk_attention(0.5, (1,))
    expected = "^attnprune.prune expects a timm VisionTransformer, got Linear; convert a transformers or open_clip"
    with pytest.raises(TypeError, match=expected):
        prune(torch.nn.Linear(2, 2), routing)

    model = tiny_vit()
    model.blocks[0] = ResPostBlock(48, 3).eval()
    with torch.no_grad():
        reference = model(images)
        # blocks before the first rule run their own forward: a rule keeping every token changes nothing
        keep_all = Routing.from_dict({"rules": [{"layer": 1, "score": "l2_norm", "keep": 1.0}]})
        torch.testing.assert_close(prune(model, keep_all)(images), reference, rtol=0, atol=1e-5)
    message = "^block 0 is a ResPostBlock with Attention; attnprune prunes timm's pre-norm Block with Attention$"
    with pytest.raises(TypeError, match=message):
        prune(model, Routing.topk_attention(0.5, (0,)))

    rules = [{"layer": 0, "score": "l2_norm", "keep": 0.5}, {"layer": 2, "score": "cls_attention", "keep": 0.5}]
    message = (
        "^routing rule 1: field 'score' is 'cls_attention', which reads the class token, "
        r"but the model has none \(class_token=False\)$"
    )
    with pytest.raises(ValueError, match=message):
        prune(tiny_vit(class_token=False, global_pool="avg"), Routing.from_dict({"rules": rules}))


def test_run_blocks_resumes_at_a_block(images):
    """Running blocks 0-1 then 2-3 from the state in between equals running 0-3 (the search resumes this way)."""
    from attnprune.vit import embed, run_blocks

    rules = [{"layer": 1, "r": 16, "reduce": "merge"}, {"layer": 2, "score": "l2_norm", "keep": 32}]
    model = prune(tiny_vit(), Routing.from_dict({"rules": rules}))
    plans = model._attnprune_plans[64]
    with torch.no_grad():
        x = embed(model, images)
        full, full_size = run_blocks(model, x, None, model.routing, plans, 0, 4)
        half = run_blocks(model, x, None, model.routing, plans, 0, 2)
        rest, rest_size = run_blocks(model, *half, model.routing, plans, 2, 4)
    assert half[0].shape == (4, 49, 48) and half[1] is not None and rest.shape == (4, 33, 48)
    assert torch.equal(rest, full) and torch.equal(rest_size, full_size)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_blocks_after_a_merge_attend_proportionally(images, prop_attn):
    """After a merge at block 0, block 1 (no rule) adds log(size) to its attention logits under prop_attn,
    and is timm's own block without it."""
    from attnprune.vit import attend, feed_forward, forward_tokens

    routing = Routing.from_dict({"rules": [{"layer": 0, "r": 16, "reduce": "merge"}], "prop_attn": prop_attn})
    model = prune(tiny_vit(), routing)
    outputs = {}
    with torch.no_grad():
        _, size = forward_tokens(model, images, block_outputs=outputs)
        block, x = model.blocks[1], outputs[0]
        assert x.shape == (4, 49, 48) and size.amax() > 1
        plain = block(x)
        if prop_attn:
            bias = size.log().view(4, 1, 1, 49)
            expected = feed_forward(block, attend(block, x, bias)[0])
            assert (expected - plain).abs().max() > 1e-3
        else:
            expected = plain
    torch.testing.assert_close(outputs[1], expected, rtol=0, atol=1e-5)


def test_token_sizes_in_another_dtype_bias_attention_in_the_tokens_dtype(images):
    """float32 sizes given to a float64 model give the same output as float64 sizes."""
    from attnprune.vit import embed, run_blocks

    model = tiny_vit().double()
    routing = Routing.from_dict({"rules": [{"layer": 1, "r": 8, "reduce": "merge"}]})
    with torch.no_grad():
        x = embed(model, images.double())
        size = torch.randint(1, 4, (4, 65, 1), generator=torch.Generator().manual_seed(0))
        expected = run_blocks(model, x, size.double(), routing, {}, 0, 2)[0]
        torch.testing.assert_close(run_blocks(model, x, size.float(), routing, {}, 0, 2)[0], expected)


def test_class_attention_scores_include_the_size_bias():
    """Under proportional attention, cls_attention ranks tokens by the class token's attention with the
    log(size) bias: block 0 keeps the 4 patch tokens the biased attention probabilities rank highest."""
    from attnprune.vit import attend, feed_forward, pruned_block_forward

    model = tiny_vit()
    block, routing = model.blocks[0], Routing.topk_attention(0.5, (0,))
    (plan,) = routing.resolve(4, 8)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 48, generator=generator)
    size = torch.tensor([1.0, 1, 50, 1, 50, 1, 50, 1, 50]).expand(2, -1)[..., None]  # class token, then 8 patches
    with torch.no_grad():
        out, out_size, _ = pruned_block_forward(block, x, size, plan, routing, 1, 0)
        bias = size.log().view(2, 1, 1, 9)
        y, _, _, _, probs = attend(block, x, bias, need_probs=True)
        keep = probs[:, :, 0, 1:].mean(dim=1).topk(4).indices.sort().values
        unbiased = attend(block, x, need_probs=True)[4][:, :, 0, 1:].mean(dim=1).topk(4).indices.sort().values
    assert not torch.equal(keep, unbiased)  # the bias changes which tokens are kept
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], dim=1)
    expected = feed_forward(block, y.gather(1, rows[..., None].expand(-1, -1, 48)))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert torch.equal(out_size, size.gather(1, rows[..., None]))


def test_random_scorer_draws_from_the_routing_seed_and_the_layer(images):
    """A random drop at layer 1 with seed 3 keeps the 32 patches ranked highest by
    torch.rand(64) from a generator seeded 3 * 1_000_003 + 1, in every image."""
    from attnprune.vit import forward_tokens

    model = prune(tiny_vit(), Routing.random(0.5, (1,), seed=3))
    sources = []
    with torch.no_grad():
        forward_tokens(model, images, sources=sources)
    kept = sources[1][:, 1:].argmax(dim=2) - 1  # the input patch each remaining patch token stands for
    draw = torch.rand(64, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))
    assert kept.tolist() == [draw.topk(32).indices.sort().values.tolist()] * 4


def test_average_pooling_including_prefix_is_weighted_by_token_size():
    """With pool_include_prefix the class token is pooled too, weighted by its size."""
    from attnprune.vit import head

    model = tiny_vit(global_pool="avg", pool_include_prefix=True, fc_norm=False, num_classes=0)
    x = torch.tensor([[[100.0, 0.0], [1.0, 2.0], [4.0, -1.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0]]])
    expected = torch.tensor([[(100.0 + 1.0 + 3 * 4.0) / 5, (0.0 + 2.0 - 3 * 1.0) / 5]])
    torch.testing.assert_close(head(model, x, size), expected)
    torch.testing.assert_close(head(model, x, torch.ones(1, 3, 1)), model.forward_head(x))


def _attention_inputs(**overrides):
    model = tiny_vit(**overrides)
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(1))
    size = torch.tensor([1.0, 1, 2, 1, 5, 1, 1, 3, 1]).expand(2, -1)
    return model.blocks[0], x, size.log().view(2, 1, 1, 9)


def test_attend_paths_agree_and_match_timms_block():
    """The fused kernel, the materialised probabilities and the lean bias-as-channel kernel give the same tokens,
    timm's block without bias; probabilities only when asked for, and they are the biased softmax."""
    from attnprune.fused import use_impl
    from attnprune.vit import attend, feed_forward

    block, x, bias = _attention_inputs()
    with torch.no_grad():
        plain, q, k, _, probs = attend(block, x)
        assert probs is None
        torch.testing.assert_close(feed_forward(block, plain), block(x), rtol=0, atol=1e-5)
        for b in (None, bias):
            reference = attend(block, x, b)[0]
            materialised, _, _, _, probs = attend(block, x, b, need_probs=True)
            logits = q @ k.transpose(-2, -1) * block.attn.scale + (0 if b is None else b)
            torch.testing.assert_close(probs, logits.softmax(dim=-1), rtol=0, atol=1e-6)
            torch.testing.assert_close(materialised, reference, rtol=0, atol=1e-5)
            with use_impl("fused"):
                torch.testing.assert_close(attend(block, x, b)[0], reference, rtol=0, atol=1e-5)
        assert (attend(block, x, bias)[0] - plain).abs().max() > 1e-3


def test_attend_applies_attention_dropout_in_training_only():
    """With attention dropout 0.5: in training the same seed gives timm's attention (and the lean kernel's),
    in eval no dropout at all."""
    from attnprune.fused import use_impl
    from attnprune.vit import attend

    block, x, bias = _attention_inputs(attn_drop_rate=0.5)
    with torch.no_grad():
        timm_eval = x + block.attn(block.norm1(x))
        torch.testing.assert_close(attend(block, x)[0], timm_eval, rtol=0, atol=1e-6)
        block.train()
        torch.manual_seed(0)
        timm_train = x + block.attn(block.norm1(x))
        torch.manual_seed(0)
        torch.testing.assert_close(attend(block, x)[0], timm_train, rtol=0, atol=1e-6)
        assert (timm_train - timm_eval).abs().max() > 1e-2
        torch.manual_seed(0)
        reference = attend(block, x, bias)[0]
        with use_impl("fused"):
            torch.manual_seed(0)
            torch.testing.assert_close(attend(block, x, bias)[0], reference, rtol=0, atol=1e-5)


def test_attend_applies_the_attention_gate():
    """A gated attention (timm's ``gate``) multiplies the attention output by its sigmoid gate, as timm does."""
    from attnprune.vit import attend, feed_forward

    block, x, _ = _attention_inputs()
    torch.manual_seed(2)
    block.attn.gate = torch.nn.Linear(48, 48)
    with torch.no_grad():
        reference = block(x)
        torch.testing.assert_close(feed_forward(block, attend(block, x)[0]), reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            feed_forward(block, attend(block, x, need_probs=True)[0]), reference, rtol=0, atol=1e-5
        )
        block.attn.gate = None
        assert (block(x) - reference).abs().max() > 1e-3


def test_tokens_out_counts_merges_from_the_tokens_present():
    """A merge of r counts from the tokens present (tokens - prefix - r), other plans give n_out; None when a
    block removes nothing (r 0, keep all)."""
    from attnprune.vit import _tokens_out

    rules = [
        {"layer": 0, "r": 8, "reduce": "merge"},
        {"layer": 1, "r": 1, "reduce": "merge"},
        {"layer": 2, "r": 0, "reduce": "merge"},
        {"layer": 3, "keep": 40, "reduce": "merge"},
    ]
    merge_8, merge_1, merge_0, merge_keep = Routing.from_dict({"rules": rules}).resolve(4, 64)
    assert (merge_8.n_in, merge_8.n_out) == (64, 56)
    assert _tokens_out(merge_8, 1 + 64, 1) == 56
    assert _tokens_out(merge_8, 2 + 40, 2) == 32  # not the plan's 56
    assert _tokens_out(merge_1, 1 + 56, 1) == 55
    assert _tokens_out(merge_0, 1 + 55, 1) is None
    assert (merge_keep.n_in, merge_keep.n_out) == (55, 40) and _tokens_out(merge_keep, 1 + 30, 1) == 40
    keep_all, drop_half = Routing.from_dict(
        {"rules": [{"layer": 0, "score": "l2_norm", "keep": 1.0}, {"layer": 1, "score": "l2_norm", "keep": 0.5}]}
    ).resolve(4, 64)
    assert _tokens_out(keep_all, 65, 1) is None and _tokens_out(drop_half, 65, 1) == 32
    assert _tokens_out(None, 65, 1) is None
