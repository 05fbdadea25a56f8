"""PiToMe (``Routing.pitome``, the reducers ``energy_merge`` and ``energy_bipartite``) against the official
hchautran/PiToMe timm patch, and by hand."""

import doctest
import math

import pytest
import torch
from safetensors.torch import load_file

from attnprune import Routing, count_flops, prune
from attnprune.errors import UserError
from attnprune.flops import reducer_flops
from attnprune.reduction import REDUCERS
from attnprune.reduction.pitome import energy_bipartite, energy_merge, energy_score
from tests.conftest import assert_matches_official, official_fixture_commit, tiny_vit
from tests.pitome_reference import CASES, FIXTURE, official_token_counts, seeded_images, seeded_vit
from tests.test_flops import measured_macs


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_official_implementation(case):
    spec = CASES[case]
    reference = load_file(FIXTURE)[case]
    model = seeded_vit(case)
    routing = Routing.pitome(spec["ratio"], spec["depth"])
    tokens = (spec["img_size"] // spec["patch_size"]) ** 2
    # our keep = ratio rounds up where PiToMe removes floor(T - T * ratio): the same counts in every case here
    assert routing.token_counts(spec["depth"], tokens) == official_token_counts(tokens, spec["ratio"], spec["depth"])
    with torch.no_grad():
        unpruned = model(seeded_images(case))
        ours = prune(model, routing)(seeded_images(case))
    assert_matches_official(ours, unpruned, reference)


def test_fixture_records_its_cases():
    assert official_fixture_commit(FIXTURE, CASES) == "550b5deed94aadfeac28bfbe381d87e672044a40"


def _keys(degrees):
    """Unit 2-d keys at the given angles, prefixed by a class token's key: ``[1, 1 + n, 2]``."""
    angles = torch.tensor([45.0, *degrees], dtype=torch.float64).deg2rad()
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None]


# six patch tokens: a cluster at 0, 12, -20 and 4 degrees, one token at 90 and one at -90. In descending energy
# (margin 0.5, checked against the formula below): 0, 5, 1, 2 (the cluster, densest first), then 4 and 3
ANGLES = [0.0, 12.0, -20.0, 90.0, -90.0, 4.0]


def test_energy_score_by_hand():
    for margin in (0.5, 0.0, -0.3):
        energy = energy_score(_keys(ANGLES)[:, 1:], margin)[0]
        for i, a in enumerate(ANGLES):
            terms = [math.cos(math.radians(a - b)) - margin for b in ANGLES]
            expected = sum(t if t > 0 else math.exp(t) - 1 for t in terms) / len(ANGLES)
            assert energy[i].item() == pytest.approx(expected, abs=1e-12)
    assert energy_score(_keys(ANGLES)[:, 1:], 0.5)[0].argsort(descending=True).tolist() == [0, 5, 1, 2, 4, 3]


def _tokens():
    """Values 100 (class token), then 0-5 for the patches; sizes 1, then 2, 1, 1, 1, 3, 1."""
    x = torch.tensor([100.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)[None, :, None]
    size = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 3.0, 1.0], dtype=torch.float64)[None, :, None]
    return x, size


def test_energy_merge_protects_the_low_energy_tokens():
    x, size = _tokens()
    # r = 2: the 4 highest-energy tokens 0, 5, 1, 2 alternate into A = {0, 1} and B = {5, 2}; both A tokens are most
    # similar to token 5 (4 and 8 degrees away, against 20 and 32 to token 2); tokens 4 and 3 are protected
    out, new_size = energy_merge(x, size, 4, 1, metric=_keys(ANGLES), margin=0.5)
    assert out.flatten().tolist() == [100.0, 4.0, 3.0, (0.0 * 2 + 1.0 + 5.0) / 4, 2.0]
    assert new_size.flatten().tolist() == [1.0, 3.0, 1.0, 4.0, 1.0]
    # r = 1: only the two highest-energy tokens take part: 0 merges into 5, and 1, 2, 4, 3 are untouched
    out, new_size = energy_merge(x, size, 5, 1, metric=_keys(ANGLES), margin=0.5)
    assert out.flatten().tolist() == pytest.approx([100.0, 1.0, 2.0, 4.0, 3.0, 5.0 / 3], abs=1e-12)
    assert new_size.flatten().tolist() == [1.0, 1.0, 1.0, 3.0, 1.0, 3.0]
    assert torch.equal(out[:, 1:5], x[:, [2, 3, 5, 4]])  # protected tokens are copied, not averaged
    # without sizes every token counts once
    out, new_size = energy_merge(x, None, 5, 1, metric=_keys(ANGLES), margin=0.5)
    assert new_size.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 2.0] and out[0, -1, 0].item() == 2.5


def test_energy_bipartite_matches_all_tokens_in_energy_order():
    x, size = _tokens()
    # energy order 0, 5, 1, 2, 4, 3: A = {0, 1, 4}, B = {5, 2, 3}; best partners 0 -> 5 (4 degrees), 1 -> 5 (8),
    # 4 -> 2 (70): r = 2 merges the two best-matched A tokens, 0 and 1, into token 5
    out, new_size = energy_bipartite(x, size, 4, 1, metric=_keys(ANGLES), margin=0.5)
    assert out.flatten().tolist() == [100.0, 4.0, 1.5, 2.0, 3.0]
    assert new_size.flatten().tolist() == [1.0, 3.0, 4.0, 1.0, 1.0]
    # r = 3 merges every A token: 4 into 2 as well
    out, new_size = energy_bipartite(x, size, 3, 1, metric=_keys(ANGLES), margin=0.5)
    assert out.flatten().tolist() == [100.0, 1.5, (2.0 + 4.0 * 3) / 4, 3.0]
    assert new_size.flatten().tolist() == [1.0, 4.0, 4.0, 1.0]


def test_reducer_records():
    for name, limit in (("energy_merge", [0, 1, 1, 2, 32]), ("energy_bipartite", [0, 1, 2, 2, 32])):
        reducer = REDUCERS[name]
        assert (reducer.metric, reducer.options, reducer.required) == ("keys", ("margin",), ("margin",))
        assert not reducer.takes_score and reducer.averages and reducer.added == 0
        assert [reducer.max_removed(n) for n in (1, 2, 3, 4, 64)] == limit


def test_preset_rules_and_example():
    routing = Routing.pitome(0.9, 5)
    assert [rule.reduce for rule in routing.rules] == ["energy_bipartite"] * 3 + ["energy_merge"] * 2
    assert [rule.margin for rule in routing.rules] == [0.75 - 0.75 * (i / 5) for i in range(5)]  # as the official code
    assert {rule.keep for rule in routing.rules} == {0.9} and not routing.prop_attn
    assert Routing.pitome(1.0, 12) == Routing((), name="pitome-1", prop_attn=False)
    finder = doctest.DocTestFinder()
    for test in finder.find(Routing.pitome, "Routing.pitome") + finder.find(energy_score, "energy_score"):
        assert doctest.DocTestRunner().run(test).failed == 0


def test_yaml_round_trip_and_spec(tmp_path):
    routing = Routing.pitome(0.83, 7)
    path = tmp_path / "pitome.yaml"
    routing.to_yaml(path)
    assert Routing.from_yaml(path) == routing
    assert "{layer: 6, keep: 0.83, reduce: energy_merge, margin: 0.1071428571428572}" in path.read_text()
    assert Routing.parse("pitome:ratio=0.9", 12) == Routing.pitome(0.9, 12)
    assert Routing.parse("pitome:ratio=0.9", 12).name == "pitome-0.9"


def test_count_flops_matches_torch_counter():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    for ratio in (0.9, 0.7, 0.5):
        routing = Routing.pitome(ratio, 4)
        assert count_flops(model, routing) == pytest.approx(measured_macs(prune(model, routing), x), rel=5e-3)
    # the counter sees the matrix products only: at ratio 0.9 (64, 58, 53, 48, 44 patch tokens) the rest is the
    # size-weighted averaging of width 48, products and divisions of the bipartite blocks, 3 r of the others
    routing = Routing.pitome(0.9, 4)
    averaging = ((2 * 64 - 6) + (2 * 58 - 5) + 3 * 5 + 3 * 4) * 48
    assert count_flops(model, routing) - averaging == measured_macs(prune(model, routing), x)
    assert count_flops(model, Routing.pitome(0.7, 4)) < 0.7 * count_flops(model)


def test_reducer_flops_by_hand():
    # 65 tokens (class + 64 patches) of width 48, 3 heads of 16; keep 0.75 removes r = 16
    bipartite, protected = Routing.pitome(0.75, 2).resolve(2, 64)
    assert (bipartite.n_in, bipartite.n_out) == (64, 48)
    energy = 64 * 64 * 16  # every pair of patch keys
    assert reducer_flops(bipartite, 65, 48, 16) == energy + 32 * 32 * 16 + (2 * 64 - 16) * 48
    # the protected merge on 48 tokens removes 12: 12 A keys against 12 B keys, 24 products and 12 divisions
    assert reducer_flops(protected, 49, 48, 16) == 48 * 48 * 16 + 12 * 12 * 16 + 36 * 48


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Routing.pitome(0.0, 12), r"^PiToMe's ratio must be a fraction in \(0, 1\] .*got 0\.0$"),
        (lambda: Routing.pitome(1.5, 12), r"^PiToMe's ratio must be .*got 1\.5$"),
        (lambda: Routing.pitome("0.9", 12), r"^PiToMe's ratio must be .*got '0\.9'$"),
        (lambda: Routing.pitome(float("nan"), 12), r"^PiToMe's ratio must be .*got nan$"),
        (lambda: Routing.pitome(0.9, 0), r"^PiToMe's depth must be .*got 0$"),
        (lambda: Routing.parse("pitome:ratio=most", 12), r"^routing preset 'pitome:ratio=most': could not convert"),
        (lambda: Routing.parse("pitome:ratio=2", 12), r"^PiToMe's ratio must be .*got 2\.0$"),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 0, "keep": 0.9, "reduce": "energy_merge"}]}),
            r"^routing rule 0: field 'margin' is required for reduce 'energy_merge'$",
        ),
        (
            lambda: Routing.from_dict(
                {"rules": [{"layer": 0, "keep": 0.9, "reduce": "energy_bipartite", "margin": 2}]}
            ),
            r"^routing rule 0: field 'margin' must be in \[-1, 1\] \(a cosine similarity\), got 2$",
        ),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 0, "keep": 0.9, "reduce": "merge", "margin": 0.5}]}),
            r"^routing rule 0: field 'margin' is not read by reduce 'merge' "
            r"\(read by: energy_bipartite, energy_merge\)$",
        ),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 0, "keep": 1.5, "reduce": "energy_merge", "margin": 0.5}]}),
            r"^routing rule 0: field 'keep' as a fraction must be in \(0, 1\], got 1\.5$",
        ),
        (
            lambda: Routing.pitome(0.45, 4).resolve(4, 64),  # the first block would remove 35 of 64
            r"^routing rule 0: field 'keep' merges too many tokens at layer 0: keep=0\.45 \(r=35\), but with 64 "
            r"non-prefix tokens reaching it 'energy_bipartite' merges at most r=32$",
        ),
        (
            lambda: Routing.from_dict(
                {"rules": [{"layer": 1, "keep": 0.49, "reduce": "energy_merge", "margin": 0.5}]}
            ).resolve(4, 63),
            r"^routing rule 0: field 'keep' merges too many tokens at layer 1: keep=0\.49 \(r=32\), but with 63 "
            r"non-prefix tokens reaching it 'energy_merge' merges at most r=31$",
        ),
        (
            lambda: Routing.from_dict(
                {"rules": [{"layer": 0, "keep": 0.45, "reduce": "energy_bipartite", "margin": 0.5}]}
            ).resolve(4, 63),
            r"^routing rule 0: field 'keep' merges too many tokens at layer 0: keep=0\.45 \(r=34\), but with 63 "
            r"non-prefix tokens reaching it 'energy_bipartite' merges at most r=32$",
        ),
    ],
)
def test_bad_arguments_give_one_line_errors(make, message):
    with pytest.raises(UserError, match=message) as error:
        make()
    assert "\n" not in str(error.value)
