import pytest

from attnprune import Routing, Rule, prune
from tests.conftest import tiny_vit

EXAMPLE = {
    "name": "layerwise-example",
    "rules": [
        {"layer": 2, "score": "l2_norm", "keep": 0.8, "reduce": "drop"},
        {"layer": 5, "score": "cls_attention", "keep": 0.7, "reduce": "fuse"},
        {"layer": 8, "score": "cls_attention", "keep": 0.7, "reduce": "fuse"},
    ],
}


def test_from_dict_to_yaml_round_trip(tmp_path):
    routing = Routing.from_dict(EXAMPLE)
    assert routing.rules[1] == Rule(layer=5, score="cls_attention", keep=0.7, reduce="fuse")
    path = tmp_path / "r.yaml"
    routing.to_yaml(path)
    assert "  - {layer: 2, score: l2_norm, keep: 0.8, reduce: drop}" in path.read_text()
    assert Routing.from_yaml(path) == routing


def test_shipped_example_config_loads():
    routing = Routing.from_yaml("configs/routing/layerwise_example.yaml")
    assert [rule.layer for rule in routing.rules] == [2, 5, 8]


def test_rules_are_sorted_by_layer():
    routing = Routing.from_dict(
        {"rules": [{"layer": 3, "r": 2, "reduce": "merge"}, {"layer": 1, "r": 2, "reduce": "merge"}]}
    )
    assert [rule.layer for rule in routing.rules] == [1, 3]


def test_presets():
    assert Routing.tome(8, 12).token_counts(12, 196) == [196 - 8 * i for i in range(13)]
    evit = Routing.evit(keep=0.7)
    assert [(r.layer, r.score, r.reduce) for r in evit.rules] == [(i, "cls_attention", "fuse") for i in (3, 6, 9)]
    assert not evit.prop_attn
    # EViT keeps ceil(0.7 n) tokens and adds the fused one: 196 -> 138 + 1 -> 98 + 1 -> 70 + 1
    assert evit.token_counts(12, 196)[-1] == 71
    assert Routing.topk_attention(0.5, (1, 2)).token_counts(4, 64) == [64, 64, 32, 16, 16]
    assert Routing.random(0.5, (0,), seed=7).seed == 7


def test_paper_schedule_of_tome_clips_at_half_only_when_asked():
    # DeiT-S at 224 with r=16: 196 patches lose 16 a block until bipartite matching can only halve them.
    capped = Routing.tome(16, 12, num_tokens=196)
    assert capped.token_counts(12, 196) == [196, 180, 164, 148, 132, 116, 100, 84, 68, 52, 36, 20, 10]
    assert [rule.r for rule in capped.rules] == [16] * 11 + [10]  # the rules say what is merged
    with pytest.raises(ValueError, match=r"layer 11: r=16, but with 20 non-prefix tokens .* at most r=10"):
        Routing.tome(16, 12).token_counts(12, 196)  # never clipped silently


def test_r_and_keep_resolve_to_the_same_counts():
    by_r = Routing.from_dict({"rules": [{"layer": 0, "score": "std", "r": 10}]})
    by_keep = Routing.from_dict({"rules": [{"layer": 0, "score": "std", "keep": 54}]})
    assert by_r.token_counts(2, 64) == by_keep.token_counts(2, 64) == [64, 54, 54]
    fused = Routing.from_dict({"rules": [{"layer": 0, "score": "std", "r": 10, "reduce": "fuse"}]})
    assert fused.resolve(2, 64)[0].n_keep == 53 and fused.token_counts(2, 64)[-1] == 54


BAD_RULES = [
    ({"layer": -1, "score": "std", "keep": 0.5}, "layer"),
    ({"layer": "2", "score": "std", "keep": 0.5}, "layer"),
    ({"score": "std", "keep": 0.5}, "layer"),
    ({"layer": 1, "score": "nope", "keep": 0.5}, "score"),
    ({"layer": 1, "keep": 0.5}, "score"),
    ({"layer": 1, "score": "std", "keep": 0.5, "reduce": "merge"}, "score"),
    ({"layer": 1, "score": "std", "keep": 0.5, "reduce": "squash"}, "reduce"),
    ({"layer": 1, "score": "std", "keep": 1.5}, "keep"),
    ({"layer": 1, "score": "std", "keep": 0.0}, "keep"),
    ({"layer": 1, "score": "std", "keep": 0}, "keep"),
    ({"layer": 1, "score": "std", "keep": "half"}, "keep"),
    ({"layer": 1, "score": "std"}, "keep"),
    ({"layer": 1, "score": "std", "keep": 0.5, "r": 3}, "keep"),
    ({"layer": 1, "score": "std", "r": -2}, "r"),
    ({"layer": 1, "score": "std", "r": 0.5}, "r"),
    ({"layer": 1, "score": "std", "keep": 0.5, "kep": 1}, "kep"),
]


@pytest.mark.parametrize(("rule", "field"), BAD_RULES)
def test_bad_rule_names_position_and_field(rule, field):
    ok = {"layer": 0, "score": "std", "keep": 0.5}
    with pytest.raises(ValueError, match=rf"routing rule 1: field '{field}'"):
        Routing.from_dict({"rules": [ok, rule]})


def test_duplicate_layer():
    with pytest.raises(ValueError, match=r"routing rule 1: field 'layer' repeats layer 0, already used by rule 0"):
        Routing.from_dict({"rules": [{"layer": 0, "r": 2, "reduce": "merge"}, {"layer": 0, "r": 2, "reduce": "merge"}]})


def test_bad_routing_fields():
    with pytest.raises(ValueError, match="routing field 'rule' is unknown"):
        Routing.from_dict({"rule": []})
    with pytest.raises(ValueError, match="routing field 'rules' must be a list"):
        Routing.from_dict({"rules": {"layer": 0}})
    with pytest.raises(ValueError, match="routing field 'prop_attn'"):
        Routing.from_dict({"rules": [], "prop_attn": "yes"})


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - {layer: 1, score: l2_norm, keep: 2.0}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: routing rule 0: field 'keep' as a fraction must be in \(0, 1\]"):
        Routing.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        Routing.from_yaml(tmp_path / "missing.yaml")


def test_model_specific_errors_when_applied():
    model = tiny_vit()  # depth 4, 64 patch tokens
    with pytest.raises(ValueError, match=r"routing rule 0: field 'layer' is 4 but the model has 4 blocks"):
        prune(model, Routing.from_dict({"rules": [{"layer": 4, "score": "std", "keep": 0.5}]}))
    with pytest.raises(ValueError, match=r"routing rule 1: field 'keep' asks for 40 tokens but only 32"):
        prune(
            model,
            Routing.from_dict(
                {"rules": [{"layer": 0, "score": "std", "keep": 32}, {"layer": 1, "score": "std", "keep": 40}]}
            ),
        )
    with pytest.raises(ValueError, match=r"routing rule 0: field 'r' removes 64 tokens but only 64"):
        prune(model, Routing.from_dict({"rules": [{"layer": 0, "score": "std", "r": 64}]}))
    no_cls = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=r"routing rule 0: field 'score' is 'cls_attention', which reads the class"):
        prune(no_cls, Routing.topk_attention(0.5, (1,)))


def test_prune_rejects_other_models():
    import torch

    with pytest.raises(TypeError, match="expects a timm VisionTransformer, got Linear"):
        prune(torch.nn.Linear(2, 2), Routing.tome(2, 2))


def test_presets_in_full():
    evit = Routing.evit()  # EViT's defaults: keep 0.7 at blocks 3, 6 and 9
    assert (evit.name, evit.prop_attn) == ("evit-0.7", False)
    assert [r.to_dict() for r in evit.rules] == [
        {"layer": i, "score": "cls_attention", "keep": 0.7, "reduce": "fuse"} for i in (3, 6, 9)
    ]
    assert evit.rule_for(6) == evit.rules[1] and evit.rule_for(5) is None
    control = Routing.random(0.5, (1, 2))
    assert (control.name, control.seed) == ("random-0.5", 0)
    assert [r.to_dict() for r in control.rules] == [
        {"layer": i, "score": "random", "keep": 0.5, "reduce": "drop"} for i in (1, 2)
    ]
