"""Per-layer selectivity analysis: states equal timm, the batched oracle equals one forward per token, costs."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnprune import Routing, prune
from attnprune.fidelity import output_change
from attnprune.selectivity import SelectivityAnalyzer, attention_transition_depth, layer_states, oracle_importance
from tests.conftest import tiny_vit


def test_layer_states_reproduce_the_model(images):
    model = tiny_vit(reg_tokens=1)
    states, output = layer_states(model, images)
    torch.testing.assert_close(output, model(images))
    assert len(states) == 4 and states[0].ctx.attention.shape == (4, 3, 66, 66)


@pytest.mark.parametrize("variant", [{}, {"num_classes": 0, "global_pool": "avg", "class_token": False}])
def test_batched_oracle_equals_one_forward_per_token(images, variant):
    model = tiny_vit(**variant)
    states, output = layer_states(model, images)
    prefix = model.num_prefix_tokens
    importance = oracle_importance(model, states, 2, output, chunk=100)  # chunks that split images apart
    x = states[2].tokens
    for i in (0, 17, 63):
        rest = torch.cat([x[:, : prefix + i], x[:, prefix + i + 1 :]], dim=1)
        rest = model.blocks[3](model.blocks[2].mlp(model.blocks[2].norm2(rest)) + rest)
        expected = output_change(model, output, model.forward_head(model.norm(rest)))
        torch.testing.assert_close(importance[:, i], expected, rtol=1e-4, atol=1e-6)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def test_pruned_forward_never_materialises_attention(images):
    model = prune(tiny_vit(), Routing.topk_attention(0.5, (1, 2)))
    with _Shapes() as spy, torch.no_grad():
        model(images)
    # [B, heads, T, T] with T the 65, 33 or 17 tokens (the patch embedding's [B, 48, 8, 8] is not one)
    assert not any(len(s) == 4 and s[1] == 3 and s[-1] == s[-2] > 8 for s in spy.shapes)
    with _Shapes() as spy:
        layer_states(model, images)  # analysis does materialise it: the check above can fail
    assert (4, 3, 65, 65) in spy.shapes


def test_analyzer_values_in_range_and_cheap_paths(images):
    model = tiny_vit()
    analyzer = SelectivityAnalyzer(depth=4, scorers=["cls_attention", "l2_norm", "random"])
    analyzer.update(model, images[:2])
    analyzer.update(model, images[2:])
    results = analyzer.compute()
    assert analyzer.oracle_sequences == 4 * 4 * 64
    for name in ("cls_normalized_entropy", "all_gini", "head_agreement", "noise_stability", "flip_stability"):
        assert len(results[name]) == 4 and all(-1.0 <= v <= 1.0 for v in results[name]), name
    assert math.isnan(results["layer_stability"][0]) and not math.isnan(results["layer_stability"][1])
    assert all(0.0 <= v <= 1.0 for v in results["reliability_overlap_l2_norm"])
    # random scores agree with nothing: their correlation with the oracle is near zero on average
    assert abs(sum(results["reliability_spearman_random"]) / 4) < 0.2


def test_transition_depth_from_the_analysis_results():
    """The one definition (attnprune.selectivity.transition): the block from which attention leads at every later
    block, the scorer given or the best of the attention family; blocks where every scorer agrees 0 are skipped."""
    results = {
        "reliability_spearman_cls_attention": [0.5, 0.2, 0.5, 0.6, 0.0],
        "reliability_spearman_l2_norm": [0.3, 0.4, 0.4, 0.3, 0.0],
        "reliability_spearman_mean_attention": [0.9, 0.9, 0.9, 0.9, 0.0],
        "reliability_spearman_random": [0.9, 0.9, 0.9, 0.9, 0.0],  # a control, not a competitor
    }
    assert attention_transition_depth(results, "cls_attention") == 2  # led at block 0 but lost it at block 1
    assert attention_transition_depth(results) == 0  # mean_attention, the best attention scorer, leads everywhere
    assert attention_transition_depth(results, "cls_attention", informative=[True] * 5) is None  # 0 ties 0: no lead
    assert attention_transition_depth({"reliability_spearman_l2_norm": [1.0]}) is None


def _mirror_symmetric_vit():
    """A tiny ViT whose output tokens of a mirrored image are exactly the original's, mirrored: the patch kernel
    and the position embedding are left-right symmetric."""
    model = tiny_vit()
    with torch.no_grad():
        weight = model.patch_embed.proj.weight
        weight.copy_((weight + weight.flip(-1)) / 2)
        grid = model.pos_embed[:, 1:].unflatten(1, (8, 8))
        model.pos_embed[:, 1:] = ((grid + grid.flip(2)) / 2).flatten(1, 2)
    return model


def test_flip_stability_re_aligns_the_mirrored_tokens(images):
    model = _mirror_symmetric_vit()
    analyzer = SelectivityAnalyzer(depth=4, scorers=[], oracle=False, noise_std=1.0)
    analyzer.update(model, images)
    results = analyzer.compute()
    # the mirrored image's class attention is the original's, mirrored: re-aligned, the rankings agree exactly
    assert results["flip_stability"] == pytest.approx([1.0] * 4, abs=1e-4)
    assert max(results["noise_stability"]) < 0.9  # a perturbation that really changes the ranking, for contrast
