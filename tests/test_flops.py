import random

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from attnprune import Routing, count_flops, prune
from tests.conftest import random_routing, tiny_vit

aten = torch.ops.aten


def measured_macs(model, x):
    """Half the FLOPs torch's counter sees in a real forward (it counts 2 per multiply-accumulate)."""
    # On the CPU, SDPA dispatches to a kernel the counter has no formula for.
    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def test_deit_small_is_4_6_gflops():
    model = timm.create_model("deit_small_patch16_224")
    assert count_flops(model) == pytest.approx(4.6e9, rel=0.01)
    assert count_flops(model) == pytest.approx(measured_macs(model, torch.randn(1, 3, 224, 224)), rel=0.001)


def test_tome_halves_deit_small_as_the_paper_reports():
    # ToMe paper, DeiT-S with r=13: 2.7 GFLOPs
    model = timm.create_model("deit_small_patch16_224")
    assert count_flops(model, Routing.tome(13, 12)) == pytest.approx(2.7e9, rel=0.01)


def test_random_routings_match_flop_counter():
    rng = random.Random(0)
    x = torch.randn(2, 3, 32, 32)
    ratios = []
    for variant in ({}, {"reg_tokens": 2, "global_pool": "avg", "fc_norm": True}):
        model = tiny_vit(**variant)
        for _ in range(10):
            routing = random_routing(rng, len(model.blocks))
            analytic = count_flops(model, routing)
            assert analytic == pytest.approx(measured_macs(prune(model, routing), x), rel=0.02), routing
            ratios.append(analytic / count_flops(model, Routing()))
    assert min(ratios) < 0.6  # the routings do prune (a scorer can cost more than the few tokens it removes)


def test_count_uses_attached_routing_and_image_size():
    model = tiny_vit(dynamic_img_size=True)
    routing = Routing.topk_attention(0.5, (1,))
    prune(model, routing)
    assert count_flops(model) == count_flops(tiny_vit(), routing)
    assert count_flops(model, img_size=64) == pytest.approx(measured_macs(model, torch.randn(1, 3, 64, 64)), rel=0.02)


def test_matched_baselines_are_within_one_percent():
    from attnprune.routing.baselines import matched_baselines

    model = timm.create_model("deit_small_patch16_224")
    target = 0.6 * count_flops(model)
    routings = matched_baselines(model, target)
    assert set(routings) == {"tome", "evit", "topk_attention", "pitome", "random"}
    for name, routing in routings.items():
        assert count_flops(model, routing) == pytest.approx(target, rel=0.01), name
    assert [rule.layer for rule in routings["evit"].rules] == [3, 6, 9]


def _plan(rule: dict, tokens: int = 64):
    (plan,) = Routing.from_dict({"rules": [rule]}).resolve(4, tokens)
    return plan


def test_reducer_flops_by_hand():
    from attnprune.flops import reducer_flops

    # 65 tokens (class + 64 patches) of width 48, 3 heads of 16
    fuse = _plan({"layer": 1, "score": "l2_norm", "r": 8, "reduce": "fuse"})
    assert (fuse.n_keep, fuse.n_out) == (55, 56)
    assert reducer_flops(fuse, 65, 48, 16) == (64 - 55) * 48  # one weighted sum of the 9 fused tokens
    # matching: 33 set-A keys against 32 set-B keys of width 16; averaging: tokens x size and the division
    assert reducer_flops(_plan({"layer": 1, "r": 8, "reduce": "merge"}), 65, 48, 16) == 33 * 32 * 16 + 2 * 65 * 48
    assert reducer_flops(_plan({"layer": 1, "score": "l2_norm", "r": 8, "reduce": "drop"}), 65, 48, 16) == 0
    assert reducer_flops(_plan({"layer": 1, "r": 0, "reduce": "merge"}), 65, 48, 16) == 0  # nothing removed


def test_count_flops_adds_the_reducers_own_cost():
    """Routings that leave the same tokens in every block differ by exactly the reducer's (and scorer's) cost."""
    model = tiny_vit()

    def flops(rule):
        return count_flops(model, Routing.from_dict({"rules": [{"layer": 1, "r": 8, **rule}]}))

    drop = flops({"score": "random", "reduce": "drop"})  # random scores cost nothing, dropping costs nothing
    assert flops({"score": "random", "reduce": "fuse"}) - drop == 9 * 48
    assert flops({"reduce": "merge"}) - drop == 33 * 32 * 16 + 2 * 65 * 48
    assert flops({"score": "l2_norm", "reduce": "drop"}) - drop == 65 * 48  # l2_norm: one MAC per channel and token


def test_count_flops_of_the_tiny_vit_by_hand():
    # 32 px, 4 px patches: 64 patches + class token = 65 tokens of width 48; 3 heads, MLP 192, 10 classes
    def attention(t):  # qkv and proj per token, then q @ k and attention @ v
        return t * (48 * 144 + 48 * 48) + 2 * t * t * 48

    def mlp(t):
        return t * 2 * 48 * 192

    embed, head = 64 * 48 * 3 * 4 * 4, 48 * 10
    assert count_flops(tiny_vit()) == embed + 4 * (attention(65) + mlp(65)) + head == 8_958_816
    # attention top-k at block 1 keeps 32 of 64 patches: the MLP of block 1 and blocks 2-3 see 33 tokens
    cls_attention = 65 * 48 + 3 * 65
    pruned = embed + attention(65) + mlp(65) + attention(65) + cls_attention + mlp(33) + 2 * (attention(33) + mlp(33))
    assert count_flops(tiny_vit(), Routing.topk_attention(0.5, (1,))) == pruned + head == 6_000_723
    # DeiT-distilled: two prefix tokens (66 in all) and two heads
    from timm.models.deit import VisionTransformerDistilled

    from tests.conftest import TINY

    distilled = VisionTransformerDistilled(**TINY)
    assert count_flops(distilled) == embed + 4 * (attention(66) + mlp(66)) + 2 * head == 9_120_192
    with pytest.raises(ValueError, match=r"^count_flops does not model attention-pool heads \(global_pool='map'\)$"):
        count_flops(tiny_vit(global_pool="map"))


def test_matched_baselines_hit_a_reachable_target_exactly():
    from attnprune.routing.baselines import match_flops, matched_baselines

    model = tiny_vit()
    tome = Routing.tome(3, 4)
    assert matched_baselines(model, count_flops(model, tome))["tome"].rules == tome.rules
    target = count_flops(model, Routing.topk_attention(0.5, (1, 2, 3)))  # EViT's layers for 4 blocks: 1, 2, 3
    for within in (False, True):  # within: the most FLOPs not above the target, which is reachable here
        topk = matched_baselines(model, target, within=within)["topk_attention"]
        assert count_flops(model, topk) == target and [rule.layer for rule in topk.rules] == [1, 2, 3]
        assert abs(topk.rules[0].keep * 200 - round(topk.rules[0].keep * 200)) < 1e-9  # steps of 0.005
    below = matched_baselines(model, target - 1, within=True)
    assert set(below) == {"tome", "evit", "topk_attention", "pitome", "random"}
    assert all(count_flops(model, routing) <= target - 1 for routing in below.values())
    grid = [k / 1000 for k in range(200, 1001, 5)]  # the documented keep grid, searched here by brute force
    fitting = [count_flops(model, Routing.topk_attention(k, (1, 2, 3))) for k in grid]
    assert count_flops(model, below["topk_attention"]) == max(f for f in fitting if f <= target - 1)
    # match_flops's ratio is of the unpruned FLOPs, also on a model that carries a routing
    pruned = prune(tiny_vit(), Routing.topk_attention(0.5, (1,)))
    ratio = count_flops(pruned, Routing.tome(3, 4)) / count_flops(pruned, Routing())
    assert match_flops(pruned, lambda r: Routing.tome(int(r), 4), range(8), ratio).rules == Routing.tome(3, 4).rules


def test_matched_baselines_closest_schedules_and_models_without_class_token():
    from attnprune.routing.baselines import match_flops, matched_baselines

    model = tiny_vit()
    unpruned = count_flops(model)
    # ToMe's r may differ by one between blocks: [4, 3, 3, 3] is reachable exactly; r = 0 is the unpruned model
    mixed = Routing.tome([4, 3, 3, 3], 4)
    assert matched_baselines(model, count_flops(model, mixed))["tome"].rules == mixed.rules
    assert count_flops(model, matched_baselines(model, unpruned)["tome"]) == unpruned
    # by default the closest, even above the target; the random control is seeded with 0
    target = count_flops(model, Routing.topk_attention(0.5, (1, 2, 3)))
    closest = matched_baselines(model, target - 1)
    assert count_flops(model, closest["topk_attention"]) == target and closest["random"].seed == 0
    # EViT and attention top-k read the class token: a model without one gets ToMe and random only
    pooled = tiny_vit(class_token=False, global_pool="avg")
    assert set(matched_baselines(pooled, 0.7 * count_flops(pooled))) == {"tome", "pitome", "random"}
    # match_flops: of the routings make(knob), the one closest to the ratio of the unpruned FLOPs
    ratio = count_flops(model, Routing.tome(3, 4)) / unpruned
    assert match_flops(model, lambda r: Routing.tome(int(r), 4), range(8), ratio).rules == Routing.tome(3, 4).rules


def test_tomes_grid_reaches_r_24_in_all_but_the_last_block():
    """ToMe's r runs 0-23 with one more in the first blocks, so on 196 tokens (224 px, patch 16) and 2 blocks the
    least FLOPs it reaches is r = [24, 23]; just below that ToMe is left out. EViT's layers scale to shallow models
    without passing the last block."""
    from timm.models.vision_transformer import VisionTransformer

    from attnprune.routing import baseline_layers
    from attnprune.routing.baselines import matched_baselines

    assert [baseline_layers(d) for d in (1, 2, 3, 4, 12)] == [(0,), (1,), (1, 2), (1, 2, 3), (3, 6, 9)]
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=4)
    hardest = Routing.tome([24, 23], 2, num_tokens=196)
    assert matched_baselines(model, count_flops(model, hardest), within=True)["tome"].rules == hardest.rules
    flat = Routing.tome([23, 23], 2, num_tokens=196)
    assert matched_baselines(model, count_flops(model, flat), within=True)["tome"].rules == flat.rules
    assert "tome" not in matched_baselines(model, count_flops(model, hardest) - 1, within=True)


def test_match_flops_keeps_the_first_of_equally_close_knobs_and_names_the_last_error():
    from attnprune.routing.baselines import match_flops

    model = tiny_vit()
    ratio = count_flops(model, Routing.tome(3, 4)) / count_flops(model)
    twice = match_flops(model, lambda r: Routing.tome(int(r), 4, prop_attn=r == 3.0), [3.0, 3.5], ratio)
    assert twice.rules == Routing.tome(3, 4).rules and twice.prop_attn  # a tie: the first knob wins
    with pytest.raises(ValueError) as error:
        match_flops(model, lambda r: Routing.tome(int(r), 4), [40, 50], 0.5)
    assert str(error.value).startswith("match_flops: none of the knobs [40, 50] gives a routing that fits the model")
    assert "(last: " in str(error.value) and "50" in str(error.value).split("(last: ")[1]


def test_ppt_is_a_baseline_with_its_threshold_calibrated_on_images():
    from attnprune.routing.baselines import matched_baselines, ppt_threshold
    from attnprune.vit import forward_tokens

    model = tiny_vit()
    images = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    target = 0.7 * count_flops(model)
    assert "ppt" not in matched_baselines(model, target)  # no images, no threshold
    threshold = ppt_threshold(model, images, 1)
    # by hand: cls_value's variance per image at block 1, from the materialised attention and the values
    block, outputs = model.blocks[1], {}
    forward_tokens(model, images, outputs)
    x = outputs[0]
    h = block.norm1(x)
    qkv = block.attn.qkv(h).reshape(9, 65, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    cls = ((q[:, :, :1] * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0].sum(1)
    scores = cls[:, 1:] * v.transpose(1, 2).reshape(9, 65, 48).norm(dim=-1)[:, 1:]
    variance = (scores / scores.sum(1, keepdim=True)).var(dim=1)
    assert threshold == pytest.approx(variance.median().item(), rel=1e-4)
    ppt = matched_baselines(model, target, within=True, calibration=images)["ppt"]
    assert [rule.layer for rule in ppt.rules] == [1, 2, 3] and {rule.threshold for rule in ppt.rules} == {threshold}
    assert count_flops(model, ppt) <= target
