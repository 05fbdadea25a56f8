import re

import pytest
import yaml

from attnprune import LayerPlan, Routing, Rule, prune
from attnprune.reduction import REDUCERS
from attnprune.routing import max_merge
from tests.conftest import tiny_vit

EXAMPLE = {
    "name": "layerwise-example",
    "rules": [
        {"layer": 2, "score": "l2_norm", "keep": 0.8, "reduce": "drop"},
        {"layer": 5, "score": "cls_attention", "keep": 0.7, "reduce": "fuse"},
        {"layer": 8, "score": "cls_attention", "keep": 0.7, "reduce": "fuse"},
    ],
}
SCORER_NAMES = (
    "cls_attention, cls_similarity, cls_value, distinctiveness, kurtosis, l1_norm, l2_norm, max_abs, mean_attention, "
    "random, redundancy, std"
)


def exactly(message: str) -> str:
    """A ``match`` pattern accepting ``message`` and nothing else."""
    return "^" + re.escape(message) + "$"


def rules(*raw: dict) -> Routing:
    return Routing.from_dict({"rules": list(raw)})


def test_from_dict_to_yaml_round_trip(tmp_path):
    routing = Routing.from_dict(EXAMPLE)
    assert routing.rules[1] == Rule(layer=5, score="cls_attention", keep=0.7, reduce="fuse")
    path = tmp_path / "r.yaml"
    routing.to_yaml(path)
    assert "  - {layer: 2, score: l2_norm, keep: 0.8, reduce: drop}" in path.read_text()
    assert Routing.from_yaml(path) == routing


def test_to_yaml_writes_the_exact_text(tmp_path):
    """Head fields in to_dict's order, then one flow-style line per rule in layer order; the file holds the same."""
    routing = Routing.from_dict(
        {
            "name": "mix",
            "seed": 2,
            "prop_attn": False,
            "rules": [
                {"layer": 3, "r": 4, "reduce": "merge"},
                {"layer": 1, "score": "std", "keep": 0.5, "reduce": "fuse"},
            ],
        }
    )
    text = "name: mix\nprop_attn: false\nseed: 2\nrules:\n  - {layer: 1, score: std, keep: 0.5, reduce: fuse}\n"
    text += "  - {layer: 3, r: 4, reduce: merge}\n"
    assert routing.to_yaml() == text
    path = tmp_path / "mix.yaml"
    assert routing.to_yaml(str(path)) == text and path.read_text() == text
    assert Routing.from_yaml(str(path)) == routing
    assert routing.to_dict() == {
        "name": "mix",
        "prop_attn": False,
        "seed": 2,
        "rules": [{"layer": 1, "score": "std", "keep": 0.5, "reduce": "fuse"}, {"layer": 3, "r": 4, "reduce": "merge"}],
    }


def test_to_yaml_of_no_rules_says_an_empty_list():
    """An empty routing writes ``rules: []``, not a bare ``rules:``."""
    assert Routing().to_yaml() == "name: unpruned\nprop_attn: true\nseed: 0\nrules: []\n"


def test_rule_to_dict_leaves_out_unset_fields():
    assert Rule(layer=3, r=2, reduce="merge").to_dict() == {"layer": 3, "r": 2, "reduce": "merge"}
    assert Rule(layer=1, score="std", keep=0.5).to_dict() == {"layer": 1, "score": "std", "keep": 0.5, "reduce": "drop"}


def test_shipped_example_config_loads():
    routing = Routing.from_yaml("configs/routing/layerwise_example.yaml")
    assert [rule.layer for rule in routing.rules] == [2, 5, 8]


def test_rules_are_sorted_by_layer():
    routing = Routing.from_dict(
        {"rules": [{"layer": 3, "r": 2, "reduce": "merge"}, {"layer": 1, "r": 2, "reduce": "merge"}]}
    )
    assert [rule.layer for rule in routing.rules] == [1, 3]


def test_default_routing_and_from_dict_defaults():
    """Routing() is the unpruned routing; from_dict names an unnamed routing 'routing', keeps prop_attn and seed 0."""
    empty = Routing()
    assert (empty.rules, empty.name, empty.prop_attn, empty.seed, len(empty)) == ((), "unpruned", True, 0, 0)
    assert empty.resolve(2, 5) == [] and empty.token_counts(2, 5) == [5, 5, 5]
    for d in ({}, {"rules": []}):
        loaded = Routing.from_dict(d)
        assert (loaded.rules, loaded.name, loaded.prop_attn, loaded.seed) == ((), "routing", True, 0)


def test_from_dict_passes_every_field():
    """name is turned into a string; seed, prop_attn and rules (a tuple is a list too) are taken as given."""
    routing = Routing.from_dict(
        {"name": 7, "seed": 3, "prop_attn": False, "rules": ({"layer": 2, "score": "random", "keep": 4},)}
    )
    assert (routing.name, routing.seed, routing.prop_attn, len(routing)) == ("7", 3, False, 1)
    assert routing.rules == (Rule(layer=2, score="random", keep=4),)
    assert routing.rule_for(2) is routing.rules[0] and routing.rule_for(0) is None


def test_routing_accepts_rule_objects_and_checks_them():
    """Rules given as Rule objects are validated like mappings, with their position."""
    ok = Rule(layer=0, score="std", keep=0.5)
    assert Routing((ok,)).rules == (ok,)
    with pytest.raises(
        ValueError,
        match=exactly("routing rule 1: field 'keep' or 'r' must be given, exactly one of them (got keep=None, r=None)"),
    ):
        Routing((ok, Rule(layer=1, score="std")))


def test_boundary_values_are_accepted():
    """keep 1 (a count) and 1.0 (a fraction), r 0 and layer 0 are valid rules."""
    routing = rules(
        {"layer": 0, "score": "std", "keep": 1.0},
        {"layer": 1, "score": "std", "r": 0},
        {"layer": 2, "r": 0, "reduce": "merge"},
        {"layer": 3, "score": "std", "keep": 1},
    )
    assert [rule.to_dict() for rule in routing.rules] == [
        {"layer": 0, "score": "std", "keep": 1.0, "reduce": "drop"},
        {"layer": 1, "score": "std", "r": 0, "reduce": "drop"},
        {"layer": 2, "r": 0, "reduce": "merge"},
        {"layer": 3, "score": "std", "keep": 1, "reduce": "drop"},
    ]
    assert routing.token_counts(4, 10) == [10, 10, 10, 10, 1]


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


def test_tome_rules_names_and_defaults():
    """One merge rule per block with r > 0; named after an integer r; proportional attention unless switched off."""
    tome = Routing.tome(2, 3)
    assert tome.rules == tuple(Rule(layer=i, r=2, reduce="merge") for i in range(3))
    assert (tome.name, tome.prop_attn, tome.seed) == ("tome-r2", True, 0)
    listed = Routing.tome([1, 0, 2], 3, prop_attn=False)
    assert listed.rules == (Rule(layer=0, r=1, reduce="merge"), Rule(layer=2, r=2, reduce="merge"))
    assert (listed.name, listed.prop_attn) == ("tome", False)
    assert Routing.tome((3, 1), 2).rules == (Rule(layer=0, r=3, reduce="merge"), Rule(layer=1, r=1, reduce="merge"))
    assert Routing.tome((3, 1), 2).name == "tome"
    zero = Routing.tome(0, 2)
    assert (zero.rules, zero.name) == ((), "tome-r0")


def test_tome_caps_each_block_at_half_of_the_tokens_left():
    """With num_tokens, r is capped block by block: 8 -> min(3, 4) = 3 -> 5 -> min(3, 2) = 2 -> 3 -> 1 -> 2 -> 1."""
    capped = Routing.tome([3, 3, 3, 3], 4, num_tokens=8)
    assert [(rule.layer, rule.r) for rule in capped.rules] == [(0, 3), (1, 2), (2, 1), (3, 1)]
    assert capped.token_counts(4, 8) == [8, 5, 3, 2, 1]
    assert [(rule.layer, rule.r) for rule in Routing.tome([0, 5], 2, num_tokens=6).rules] == [(1, 3)]
    assert Routing.tome(2, 2, num_tokens=1).rules == ()  # one token: nothing to pair


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 2), "ToMe's r must be an integer >= 0 (tokens merged per block), got r=-1"),
        (([2, -1, 1.5], 3), "ToMe's r must be an integer >= 0 (tokens merged per block), got r=-1"),
        (([2, 1.5, -1], 3), "ToMe's r must be an integer >= 0 (tokens merged per block), got r=1.5"),
        ((True, 2), "ToMe's r must be an integer >= 0 (tokens merged per block), got r=True"),
        (([1, 2], 3), "ToMe schedule has 2 values of r for a model of depth 3"),
        ((2, 2, True, 0), "ToMe's num_tokens must be an integer >= 1, got num_tokens=0"),
        ((2, 2, True, 2.0), "ToMe's num_tokens must be an integer >= 1, got num_tokens=2.0"),
        ((2, 2, True, True), "ToMe's num_tokens must be an integer >= 1, got num_tokens=True"),
    ],
)
def test_tome_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=exactly(message)):
        Routing.tome(*args)


def test_r_and_keep_resolve_to_the_same_counts():
    by_r = Routing.from_dict({"rules": [{"layer": 0, "score": "std", "r": 10}]})
    by_keep = Routing.from_dict({"rules": [{"layer": 0, "score": "std", "keep": 54}]})
    assert by_r.token_counts(2, 64) == by_keep.token_counts(2, 64) == [64, 54, 54]
    fused = Routing.from_dict({"rules": [{"layer": 0, "score": "std", "r": 10, "reduce": "fuse"}]})
    assert fused.resolve(2, 64)[0].n_keep == 53 and fused.token_counts(2, 64)[-1] == 54


def test_fuse_adds_a_token_only_when_it_removes_some():
    """keep 1.0 and r 0 fuse nothing; r 1 keeps 10 - 1 - 1 = 8 and adds the fused token; keep 0.5 of 9 keeps 5."""
    routing = rules(
        {"layer": 0, "score": "std", "keep": 1.0, "reduce": "fuse"},
        {"layer": 1, "score": "std", "r": 0, "reduce": "fuse"},
        {"layer": 2, "score": "std", "r": 1, "reduce": "fuse"},
        {"layer": 3, "score": "std", "keep": 0.5, "reduce": "fuse"},
    )
    r = routing.rules
    assert routing.resolve(4, 10) == [
        LayerPlan(r[0], 10, 10, 10),
        LayerPlan(r[1], 10, 10, 10),
        LayerPlan(r[2], 10, 8, 9),
        LayerPlan(r[3], 9, 5, 6),
    ]


def test_keep_fractions_round_up_to_at_least_one_token():
    """0.7 of 10 is 7 despite float noise (7.000000000000001), 0.5 of 7 is 4, 0.01 of 4 is 1, 1e-12 of 1 is 1."""
    routing = rules(
        {"layer": 0, "score": "std", "keep": 0.7},
        {"layer": 1, "score": "std", "keep": 0.5},
        {"layer": 2, "score": "std", "keep": 0.01},
        {"layer": 3, "score": "std", "keep": 1e-12},
    )
    r = routing.rules
    assert routing.resolve(4, 10) == [
        LayerPlan(r[0], 10, 7, 7),
        LayerPlan(r[1], 7, 4, 4),
        LayerPlan(r[2], 4, 1, 1),
        LayerPlan(r[3], 1, 1, 1),
    ]


def test_keep_counts_up_to_the_tokens_left():
    """An integer keep may equal the tokens reaching its layer, not exceed them."""
    routing = rules({"layer": 0, "score": "std", "keep": 10}, {"layer": 2, "score": "std", "keep": 1})
    assert routing.resolve(3, 10) == [LayerPlan(routing.rules[0], 10, 10, 10), LayerPlan(routing.rules[1], 10, 1, 1)]
    too_many = rules({"layer": 0, "score": "std", "keep": 4}, {"layer": 2, "score": "std", "keep": 5})
    message = (
        "routing rule 1: field 'keep' asks for 5 tokens but only 4 non-prefix tokens reach this layer (at most keep=4)"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        too_many.resolve(3, 10)


def test_r_removes_at_most_all_but_one_token_or_all_when_fused():
    """drop keeps at least one token; fuse may select none, since the fused token remains."""
    drop = rules({"layer": 1, "score": "std", "r": 9})
    assert drop.resolve(2, 10) == [LayerPlan(drop.rules[0], 10, 1, 1)]
    fuse = rules({"layer": 1, "score": "std", "r": 9, "reduce": "fuse"})
    assert fuse.resolve(2, 10) == [LayerPlan(fuse.rules[0], 10, 0, 1)]
    message = "routing rule 0: field 'r' removes 10 tokens but only 10 non-prefix tokens reach layer 1 (at most r=9)"
    for reduce in ("drop", "fuse"):
        with pytest.raises(ValueError, match=exactly(message)):
            rules({"layer": 1, "score": "std", "r": 10, "reduce": reduce}).resolve(2, 10)
    one_left = rules(
        {"layer": 0, "score": "std", "r": 9, "reduce": "fuse"}, {"layer": 2, "score": "std", "r": 1, "reduce": "drop"}
    )
    message = "routing rule 1: field 'r' removes 1 tokens but only 1 non-prefix tokens reach layer 2 (at most r=0)"
    with pytest.raises(ValueError, match=exactly(message)):
        one_left.resolve(3, 10)


def test_merge_resolves_r_and_keep_up_to_half_of_the_tokens():
    """merge r 5 of 10 (the most), keep 0.5 of 5 (3 kept, 2 merged: the most), keep 2 of 3."""
    routing = rules(
        {"layer": 1, "r": 5, "reduce": "merge"},
        {"layer": 2, "keep": 0.5, "reduce": "merge"},
        {"layer": 3, "keep": 2, "reduce": "merge"},
    )
    r = routing.rules
    assert routing.resolve(4, 10) == [LayerPlan(r[0], 10, 5, 5), LayerPlan(r[1], 5, 3, 3), LayerPlan(r[2], 3, 2, 2)]
    assert routing.token_counts(4, 10) == [10, 10, 5, 3, 2]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            [{"layer": 0, "r": 5, "reduce": "merge"}, {"layer": 2, "r": 3, "reduce": "merge"}],
            "routing rule 1: field 'r' merges too many tokens at layer 2: r=3, but with 5 non-prefix tokens reaching "
            "it 'merge' merges at most r=2",
        ),
        (
            [{"layer": 0, "r": 2, "reduce": "merge"}, {"layer": 2, "keep": 0.25, "reduce": "merge"}],
            "routing rule 1: field 'keep' merges too many tokens at layer 2: keep=0.25 (r=6), but with 8 non-prefix "
            "tokens reaching it 'merge' merges at most r=4",
        ),
        (
            [{"layer": 0, "r": 2, "reduce": "merge"}, {"layer": 2, "keep": 9, "reduce": "merge"}],
            "routing rule 1: field 'keep' asks for 9 tokens but only 8 non-prefix tokens reach this layer "
            "(at most keep=8)",
        ),
    ],
)
def test_merge_errors_name_rule_field_and_limit(raw, message):
    with pytest.raises(ValueError, match=exactly(message)):
        rules(*raw).resolve(3, 10)


def test_layers_must_fit_the_depth():
    routing = rules({"layer": 1, "score": "std", "keep": 0.5}, {"layer": 3, "score": "std", "keep": 0.5})
    assert routing.token_counts(4, 10) == [10, 10, 5, 5, 3]
    with pytest.raises(
        ValueError, match=exactly("routing rule 1: field 'layer' is 3 but the model has 3 blocks (0..2)")
    ):
        routing.resolve(3, 10)


def test_max_merge_is_half_rounded_down():
    assert [max_merge(n) for n in (1, 7, 8)] == [0, 3, 4]


BAD_RULES = [
    ({"layer": -1, "score": "std", "keep": 0.5}, "field 'layer' must be a block index >= 0, got -1"),
    ({"layer": "2", "score": "std", "keep": 0.5}, "field 'layer' must be a block index >= 0, got '2'"),
    ({"layer": True, "score": "std", "keep": 0.5}, "field 'layer' must be a block index >= 0, got True"),
    ({"score": "std", "keep": 0.5}, "field 'layer' is missing"),
    ({"layer": 1, "score": "nope", "keep": 0.5}, f"field 'score' names unknown scorer 'nope' (known: {SCORER_NAMES})"),
    ({"layer": 1, "keep": 0.5}, f"field 'score' is required for reduce 'drop' (known: {SCORER_NAMES})"),
    (
        {"layer": 1, "keep": 0.5, "reduce": "fuse"},
        f"field 'score' is required for reduce 'fuse' (known: {SCORER_NAMES})",
    ),
    (
        {"layer": 1, "score": "std", "keep": 0.5, "reduce": "merge"},
        "field 'score' must be omitted for reduce 'merge' (it matches on keys), got 'std'",
    ),
    (
        {"layer": 1, "score": "std", "keep": 0.5, "reduce": "squash"},
        f"field 'reduce' names unknown reducer 'squash' (known: {', '.join(sorted(REDUCERS))})",
    ),
    ({"layer": 1, "score": "std", "keep": 1.5}, "field 'keep' as a fraction must be in (0, 1], got 1.5"),
    ({"layer": 1, "score": "std", "keep": 0.0}, "field 'keep' as a fraction must be in (0, 1], got 0.0"),
    ({"layer": 1, "score": "std", "keep": 0}, "field 'keep' as a token count must be >= 1, got 0"),
    (
        {"layer": 1, "score": "std", "keep": "half"},
        "field 'keep' must be a fraction (float) or a token count (int), got 'half'",
    ),
    (
        {"layer": 1, "score": "std", "keep": True},
        "field 'keep' must be a fraction (float) or a token count (int), got True",
    ),
    ({"layer": 1, "score": "std"}, "field 'keep' or 'r' must be given, exactly one of them (got keep=None, r=None)"),
    (
        {"layer": 1, "score": "std", "keep": 0.5, "r": 3},
        "field 'keep' or 'r' must be given, exactly one of them (got keep=0.5, r=3)",
    ),
    ({"layer": 1, "score": "std", "r": -2}, "field 'r' must be an integer >= 0, got -2"),
    ({"layer": 1, "score": "std", "r": 0.5}, "field 'r' must be an integer >= 0, got 0.5"),
    ({"layer": 1, "score": "std", "r": True}, "field 'r' must be an integer >= 0, got True"),
    (
        {"layer": 1, "score": "std", "keep": 0.5, "zeta": 1, "kep": 1},
        "field 'kep' is not a rule field (expected one of layer, score, keep, r, reduce, prune, threshold, margin)",
    ),
]


@pytest.mark.parametrize(("rule", "message"), BAD_RULES)
def test_bad_rule_names_position_and_field(rule, message):
    ok = {"layer": 0, "score": "std", "keep": 0.5}
    with pytest.raises(ValueError, match=exactly(f"routing rule 1: {message}")):
        Routing.from_dict({"rules": [ok, rule]})


def test_a_rule_must_be_a_mapping():
    message = "routing rule 1: expected a mapping with fields (layer, score, keep, r, reduce, ...), got 'x'"
    with pytest.raises(ValueError, match=exactly(message)):
        Routing.from_dict({"rules": [{"layer": 0, "score": "std", "keep": 0.5}, "x"]})


def test_duplicate_layer():
    """Positions are those of the input, before sorting."""
    with pytest.raises(ValueError, match=r"routing rule 1: field 'layer' repeats layer 0, already used by rule 0"):
        Routing.from_dict({"rules": [{"layer": 0, "r": 2, "reduce": "merge"}, {"layer": 0, "r": 2, "reduce": "merge"}]})
    merge = {"r": 2, "reduce": "merge"}
    message = "routing rule 2: field 'layer' repeats layer 3, already used by rule 0"
    with pytest.raises(ValueError, match=exactly(message)):
        rules({"layer": 3, **merge}, {"layer": 1, **merge}, {"layer": 3, **merge})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prop_attn": "yes"}, "routing field 'prop_attn' must be true or false, got 'yes'"),
        ({"prop_attn": 1}, "routing field 'prop_attn' must be true or false, got 1"),
        ({"seed": 1.5}, "routing field 'seed' must be an integer in [0, 4294967295], got 1.5"),
        ({"seed": True}, "routing field 'seed' must be an integer in [0, 4294967295], got True"),
        ({"seed": -1}, "routing field 'seed' must be an integer in [0, 4294967295], got -1"),
    ],
)
def test_bad_prop_attn_and_seed(fields, message):
    with pytest.raises(ValueError, match=exactly(message)):
        Routing(**fields)
    with pytest.raises(ValueError, match=exactly(message)):
        Routing.from_dict(fields)


def test_bad_routing_fields():
    with pytest.raises(ValueError, match="routing field 'rule' is unknown"):
        Routing.from_dict({"rule": []})
    with pytest.raises(ValueError, match="routing field 'rules' must be a list"):
        Routing.from_dict({"rules": {"layer": 0}})
    with pytest.raises(ValueError, match="routing field 'prop_attn'"):
        Routing.from_dict({"rules": [], "prop_attn": "yes"})


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([], "a routing must be a mapping with fields ('name', 'rules', 'prop_attn', 'seed'), got list"),
        (None, "a routing must be a mapping with fields ('name', 'rules', 'prop_attn', 'seed'), got NoneType"),
        ({"zz": 1, "rule": []}, "routing field 'rule' is unknown (expected one of name, rules, prop_attn, seed)"),
        ({"rules": {"layer": 0}}, "routing field 'rules' must be a list of rules ([] for none), got dict {'layer': 0}"),
        ({"rules": "abc"}, "routing field 'rules' must be a list of rules ([] for none), got str 'abc'"),
        (
            {"rules": None},
            "routing field 'rules' must be a list of rules ([] for none), got nothing (an empty 'rules:')",
        ),
    ],
)
def test_bad_routing_field_messages(d, message):
    with pytest.raises(ValueError, match=exactly(message)):
        Routing.from_dict(d)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - {layer: 1, score: l2_norm, keep: 2.0}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: routing rule 0: field 'keep' as a fraction must be in \(0, 1\]"):
        Routing.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        Routing.from_yaml(tmp_path / "missing.yaml")


def test_yaml_error_texts(tmp_path):
    """Missing file, unparsable YAML and an empty file: each message is the path, then the cause."""
    missing = tmp_path / "missing.yaml"
    with pytest.raises(FileNotFoundError, match=exactly(f"routing file {missing} does not exist")):
        Routing.from_yaml(str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [")
    with pytest.raises(yaml.YAMLError) as parse_error:
        yaml.safe_load("rules: [")
    with pytest.raises(ValueError) as raised:
        Routing.from_yaml(broken)
    assert str(raised.value) == f"{broken}: {parse_error.value}"
    assert isinstance(raised.value.__cause__, yaml.YAMLError)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    message = f"{empty}: a routing must be a mapping with fields ('name', 'rules', 'prop_attn', 'seed'), got NoneType"
    with pytest.raises(ValueError, match=exactly(message)):
        Routing.from_yaml(empty)


def test_parse_accepts_routings_dicts_paths_and_unpruned(tmp_path):
    """A Routing passes through; None and "unpruned" are no pruning; a dict is loaded by from_dict, a str or Path
    by from_yaml."""
    routing = Routing.tome(2, 2)
    assert Routing.parse(routing) is routing and Routing.parse(None) == Routing() == Routing.parse("unpruned")
    loaded = Routing.parse({"name": "d", "rules": [{"layer": 1, "r": 3, "reduce": "merge"}]})
    assert isinstance(loaded, Routing) and (loaded.name, loaded.rules) == ("d", (Rule(layer=1, r=3, reduce="merge"),))
    path = tmp_path / "t.yaml"
    routing.to_yaml(path)
    for given in (path, str(path)):
        assert Routing.parse(given) == routing and isinstance(Routing.parse(given), Routing)


def test_parse_rejects_other_types():
    message = "a routing must be a Routing, a dict, a preset spec or the path of a routing YAML file, got int"
    with pytest.raises(TypeError, match=exactly(message)):
        Routing.parse(5)


def test_presets_by_name_resolve_to_the_baseline_routings():
    assert Routing.parse("unpruned", 12) == Routing()
    assert Routing.parse("tome:r=13", 12) == Routing.tome(13, 12)
    assert Routing.parse("evit:keep=0.7", 12) == Routing.evit(0.7, (3, 6, 9))
    assert Routing.parse("topk_attention:keep=0.7", 12) == Routing.topk_attention(0.7, (3, 6, 9))
    assert Routing.parse("random:keep=0.7,seed=3", 12) == Routing.random(0.7, (3, 6, 9), seed=3)
    assert Routing.parse("evit:keep=0.5", 4) == Routing.evit(0.5, (1, 2, 3))  # EViT's layers scaled to the depth
    assert Routing.parse("topk_attention:keep=0.6,layers=2-5", 12).rules[1].layer == 5


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("tome", ValueError, r"routing preset 'tome' needs r=\.\.\. \(tome:r=<tokens merged per block>\)"),
        ("evit:r=3", ValueError, r"routing preset 'evit:r=3': unknown argument 'r'"),
        ("evit:keep", ValueError, r"argument 'keep' is not key=value"),
        ("tome:r=x", ValueError, r"routing preset 'tome:r=x': invalid literal"),
        ("merge:r=2", ValueError, r"unknown routing preset 'merge' in 'merge:r=2'; presets: tome:r="),
        ("nowhere.yaml", FileNotFoundError, r"routing 'nowhere.yaml' is neither a routing file nor a preset"),
    ],
)
def test_bad_preset_specs_say_what_is_wrong(spec, error, message):
    with pytest.raises(error, match=message):
        Routing.parse(spec, 12)


def test_layerwise_preset_scores_statistics_first_then_attention():
    routing = Routing.parse("layerwise:keep=0.7", 12)
    assert routing == Routing.layerwise(0.7, (3, 6, 9))
    assert [(r.layer, r.score, r.keep, r.reduce) for r in routing.rules] == [
        (3, "l2_norm", 0.8, "drop"),
        (6, "cls_attention", 0.7, "fuse"),
        (9, "cls_attention", 0.7, "fuse"),
    ]
    assert Routing.layerwise(0.95, (1, 2)).rules[0].keep == 1.0  # the first keep is capped at 1
    assert Routing.layerwise(0.7, (1, 4, 7), first_keep=0.85).rules[0].keep == 0.85


def test_presets_refuse_repeated_arguments_and_a_missing_depth():
    with pytest.raises(
        ValueError,
        match=exactly("routing preset 'tome:r=2,r=3': argument 'r' is given twice (tome:r=<tokens merged per block>)"),
    ):
        Routing.parse("tome:r=2,r=3", 12)
    with pytest.raises(
        ValueError, match=exactly("routing preset 'evit:keep=0.7' needs the model's depth (Routing.parse(spec, depth))")
    ):
        Routing.parse("evit:keep=0.7")
    assert [rule.layer for rule in Routing.parse("evit:keep=0.7,layers=1-2").rules] == [1, 2]  # layers given: no depth


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
    assert (evit.name, evit.prop_attn, evit.seed) == ("evit-0.7", False, 0)
    assert [r.to_dict() for r in evit.rules] == [
        {"layer": i, "score": "cls_attention", "keep": 0.7, "reduce": "fuse"} for i in (3, 6, 9)
    ]
    assert evit.rule_for(6) == evit.rules[1] and evit.rule_for(5) is None
    assert Routing.evit(0.5, (1, 2)).name == "evit-0.5"
    control = Routing.random(0.5, (1, 2))
    assert (control.name, control.seed, control.prop_attn) == ("random-0.5", 0, True)
    assert [r.to_dict() for r in control.rules] == [
        {"layer": i, "score": "random", "keep": 0.5, "reduce": "drop"} for i in (1, 2)
    ]
    topk = Routing.topk_attention(0.25, (2, 0))
    assert (topk.name, topk.prop_attn, topk.seed) == ("topk-attention-0.25", True, 0)
    assert [r.to_dict() for r in topk.rules] == [
        {"layer": i, "score": "cls_attention", "keep": 0.25, "reduce": "drop"} for i in (0, 2)
    ]
