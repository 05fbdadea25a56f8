import random

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
