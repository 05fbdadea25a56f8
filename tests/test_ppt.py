"""PPT (``Routing.ppt``: the ``cls_value`` scorer and the ``adaptive`` reducer) against the official xjwu1024/PPT
code and on hand-computable tensors."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from attnprune import REDUCERS, SCORERS, Routing, count_flops, prune
from attnprune.errors import UserError
from attnprune.flops import reducer_flops
from attnprune.routing.presets import RoutingPresets
from attnprune.scoring import ScoreContext
from attnprune.vit import forward_tokens
from tests.conftest import TINY, assert_matches_official, tiny_vit
from tests.ppt_reference import BATCH, CASES, FIXTURE, seeded_images, seeded_vit
from tests.test_flops import measured_macs


def _metadata() -> dict[str, str]:
    with safe_open(FIXTURE, "pt") as fixture:
        return fixture.metadata()


def _routing(case: str) -> Routing:
    spec = CASES[case]
    tokens = (spec["img_size"] // spec["patch_size"]) ** 2  # PPT's code caps r where the tokens left are too few
    return Routing.ppt(spec["r"], spec["layers"], spec["threshold"], num_tokens=tokens)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_official_code(case, monkeypatch):
    reference = load_file(FIXTURE)[case]
    model = seeded_vit(case)
    decisions = []
    adaptive = REDUCERS["adaptive"]

    def spy(x, size, n_out, num_prefix, *, scores, threshold, **kwargs):
        decisions.append(int((scores.var(dim=1) >= threshold).sum()))
        return adaptive.fn(x, size, n_out, num_prefix, scores=scores, threshold=threshold, **kwargs)

    monkeypatch.setitem(REDUCERS, "adaptive", dataclasses.replace(adaptive, fn=spy))
    with torch.no_grad():
        unpruned = model(seeded_images(case))
        ours = prune(model, _routing(case))(seeded_images(case))
    assert_matches_official(ours, unpruned, reference)
    assert decisions == json.loads(_metadata()["pruned"])[case]  # the same images pruned in every PPT block


def test_fixture_covers_both_branches_and_mixed_batches():
    metadata = _metadata()
    assert json.loads(metadata["cases"]) == CASES
    pruned = json.loads(metadata["pruned"])
    for case, counts in pruned.items():
        kind = case.rsplit("-", 1)[1]
        if kind == "prune":
            assert counts == [BATCH] * len(CASES[case]["layers"]), case
        elif kind == "pool":
            assert counts == [0] * len(CASES[case]["layers"]), case
        else:
            assert any(0 < n < BATCH for n in counts), case
    assert sum(case.endswith("mix") for case in pruned) >= 3
    # one case asks for more than half the tokens left: the official code caps r, so does Routing.ppt given num_tokens
    assert [rule.r for rule in _routing("d4-w64-t16-r8-mix").rules] == [8, 4]


def test_cls_value_by_hand():
    # one image, two heads, d = 1: the class query is 0, so the attention follows the proportional-attention bias
    # alone: sizes (1, 1, 2) give (1/4, 1/4, 1/2) in each head, (1/2, 1/2, 1) summed over heads
    zeros = torch.zeros(1, 2, 3, 1)
    v = torch.tensor([[[[100.0], [3.0], [1.0]], [[100.0], [4.0], [0.0]]]])  # value norms: class 141, patches 5, 1
    bias = torch.tensor([1.0, 1.0, 2.0]).log().view(1, 1, 1, 3)
    ctx = ScoreContext(zeros, zeros, 1.0, 1, bias=bias, v=v)
    # significance (1/2 * 5, 1 * 1) over the patch tokens, normalised: (5/7, 2/7); the class token is not scored
    torch.testing.assert_close(SCORERS["cls_value"](torch.zeros(1, 3, 4), ctx), torch.tensor([[5 / 7, 2 / 7]]))
    # two prefix tokens (DeiT's distillation token): only the one patch token is scored
    assert SCORERS["cls_value"](torch.zeros(1, 3, 4), ScoreContext(zeros, zeros, 1.0, 2, bias=bias, v=v)).tolist() == [
        [1.0]
    ]
    scorer = SCORERS["cls_value"]
    assert (scorer.family, scorer.needs_class_token, scorer.needs_attention) == ("attention", True, False)
    assert scorer.flops(65, 48, 3) == 2 * 65 * 48 + 3 * 65 + 65  # class row and value norms, head sum, product
    with pytest.raises(RuntimeError, match="cls_value reads the attention values"):
        scorer(torch.zeros(1, 3, 4), ScoreContext(zeros, zeros, 1.0, 1))


# class token 0, patch tokens 10, 20, 30, 40 (sizes 1, 3, 1, 1); keys: patch 2 is nearly patch 1, patch 4 nearly 3
_X = torch.tensor([[0.0], [10.0], [20.0], [30.0], [40.0]])
_SIZE = torch.tensor([[1.0], [1.0], [3.0], [1.0], [1.0]])
_KEYS = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
_SPREAD = [0.1, 0.4, 0.2, 0.3]  # unbiased variance 0.05 / 3
_FLAT = [0.24, 0.27, 0.23, 0.26]  # unbiased variance 0.001 / 3; the same two best as _SPREAD
# pruned: the two best (patch 2, then patch 4) in score order; merged: ToMe pairs A = (patch 2, 4) with B = (1, 3)
_PRUNED, _PRUNED_SIZE = [0.0, 20.0, 40.0], [1.0, 3.0, 1.0]
_MERGED, _MERGED_SIZE = [0.0, (10.0 + 3 * 20.0) / 4, 35.0], [1.0, 4.0, 2.0]


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.0, "PP"),  # every variance is >= 0: both images prune
        (0.05 / 3, "PM"),  # the spread image's variance equals the threshold: it prunes; the flat one merges
        (0.01, "PM"),
        (1.0, "MM"),
    ],
)
def test_adaptive_by_hand(threshold, expected):
    scores = torch.tensor([_SPREAD, _FLAT])
    threshold = float(scores[0].var()) if threshold == 0.05 / 3 else threshold
    x, size, keys = _X.expand(2, -1, -1), _SIZE.expand(2, -1, -1), _KEYS.expand(2, -1, -1)
    out, out_size = REDUCERS["adaptive"](x, size, 2, 1, scores=scores, metric=keys, threshold=threshold)
    rows = {"P": (_PRUNED, _PRUNED_SIZE), "M": (_MERGED, _MERGED_SIZE)}
    torch.testing.assert_close(out[..., 0], torch.tensor([rows[b][0] for b in expected]))
    torch.testing.assert_close(out_size[..., 0], torch.tensor([rows[b][1] for b in expected]))


def test_adaptive_without_sizes_and_the_registry_record():
    def reduce(n_out: int, scores: list[float], threshold: float) -> tuple[list[float], list[float]]:
        kwargs = {"scores": torch.tensor([scores]), "metric": _KEYS[None], "threshold": threshold}
        out, size = REDUCERS["adaptive"](_X[None], None, n_out, 1, **kwargs)
        return out.flatten().tolist(), size.flatten().tolist()

    assert reduce(2, _FLAT, 1.0) == ([0.0, 15.0, 35.0], [1.0, 2.0, 2.0])
    assert reduce(3, _SPREAD, 0.0) == ([0.0, 20.0, 40.0, 30.0], [1.0] * 4)  # the kept tokens in score order
    reducer = REDUCERS["adaptive"]
    assert (reducer.takes_score, reducer.metric, reducer.options, reducer.required) == (
        True,
        "keys",
        ("threshold",),
        ("threshold",),
    )
    assert reducer.averages and reducer.added == 0
    assert [reducer.max_removed(n) for n in (1, 8, 9, 196)] == [0, 4, 4, 98]  # PPT's (N - 1) // 2, N with CLS


def test_prefix_tokens_are_never_removed_on_a_distilled_model():
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(**TINY).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for threshold in (0.0, 1.0):
        prune(model, Routing.ppt(16, (1, 2), threshold))
        sources: list[torch.Tensor] = []
        with torch.no_grad():
            tokens, _ = forward_tokens(model, images, sources=sources)
        assert tokens.shape[1] == 2 + 64 - 32
        # the class and distillation tokens stand for themselves alone in every block
        assert torch.equal(sources[-1][:, :2] > 0, torch.eye(66, dtype=torch.bool)[:2].expand(3, -1, -1))


def test_yaml_round_trip(tmp_path):
    routing = Routing.ppt(8, (3, 6, 9), 7e-5)
    path = tmp_path / "ppt.yaml"
    routing.to_yaml(path)
    loaded = Routing.from_yaml(path)
    assert loaded == routing and loaded.prop_attn and loaded.rules[0].threshold == 7e-5
    assert "{layer: 3, score: cls_value, r: 8, reduce: adaptive, threshold: 7.0e-05}" in path.read_text()


def test_spec_and_preset():
    routing = Routing.parse("ppt:r=8,layers=3-6-9,threshold=7e-5", 12)
    assert routing == Routing.ppt(8, (3, 6, 9), 7e-5)
    assert routing.name == "ppt-r8" and routing.prop_attn
    assert [rule.to_dict() for rule in routing.rules] == [
        {"layer": layer, "score": "cls_value", "r": 8, "reduce": "adaptive", "threshold": 7e-5} for layer in (3, 6, 9)
    ]
    assert [rule.layer for rule in Routing.parse("ppt:r=8,threshold=7e-5", 12).rules] == [3, 6, 9]  # EViT's layers
    # DeiT-S as PPT's README runs it: r=50 at blocks 3, 6, 9 of 196 patch tokens; the code removes 48 at block 9
    assert [rule.r for rule in Routing.ppt(50, (3, 6, 9), 7e-5, num_tokens=196).rules] == [50, 50, 48]
    assert Routing.ppt(50, (3, 6, 9), 7e-5, num_tokens=196).token_counts(12, 196)[-1] == 48
    for test in doctest.DocTestFinder().find(RoutingPresets.ppt, "Routing.ppt", globs={}):
        assert doctest.DocTestRunner().run(test).failed == 0


def test_count_flops_matches_the_flop_counter():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    # both branches run for every image, so the count does not depend on which images prune
    measured = {t: measured_macs(prune(model, Routing.ppt(8, (1, 2), t)), images) for t in (0.0, 1.0)}
    assert measured[0.0] == measured[1.0]
    analytic = count_flops(model, Routing.ppt(8, (1, 2), 7e-5))
    assert analytic == pytest.approx(measured[0.0], rel=0.02)
    # the difference is exactly the element-wise work torch's counter does not see: the value norms, the head sum and
    # product of the scorer, the size-weighted averaging and the variance, in blocks 1 (65 tokens) and 2 (57 tokens)
    unseen = sum(t * 48 + 3 * t + t + 2 * t * 48 + (t - 1) for t in (65, 57))
    assert analytic - measured[0.0] == unseen
    (plan,) = Routing.ppt(8, (1,), 7e-5).resolve(4, 64)
    assert reducer_flops(plan, 65, 48, 16) == 33 * 32 * 16 + 2 * 65 * 48 + 64  # ToMe's matching and averaging, variance


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: Routing.ppt(8, (1,), -1e-5),
            "routing rule 0: field 'threshold' must be >= 0 (a variance), got -1e-05",
        ),
        (
            lambda: Routing.ppt(8, (1,), math.nan),
            "routing rule 0: field 'threshold' must be a finite number, got nan",
        ),
        (
            lambda: Routing.parse("ppt:r=8,layers=1-2,threshold=nan", 4),
            "routing rule 0: field 'threshold' must be a finite number, got nan",
        ),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 1, "score": "cls_value", "r": 8, "reduce": "adaptive"}]}),
            "routing rule 0: field 'threshold' is required for reduce 'adaptive'",
        ),
        (
            lambda: Routing.parse("ppt:r=8,layers=1-2", 4),
            "routing preset 'ppt:r=8,layers=1-2' needs threshold=... "
            "(ppt:r=<tokens removed per layer>,threshold=<variance>[,layers=3-6-9])",
        ),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 1, "r": 8, "reduce": "merge", "threshold": 1e-4}]}),
            "routing rule 0: field 'threshold' is not read by reduce 'merge' (read by: adaptive)",
        ),
        (
            lambda: Routing.from_dict({"rules": [{"layer": 1, "r": 8, "reduce": "adaptive", "threshold": 1e-4}]}),
            "routing rule 0: field 'score' is required for reduce 'adaptive' (known: ",
        ),
        (
            lambda: prune(tiny_vit(), Routing.ppt(24, (1, 2), 1e-4)),
            "routing rule 1: field 'r' merges too many tokens at layer 2: r=24, but with 40 non-prefix tokens "
            "reaching it 'adaptive' merges at most r=20",
        ),
        (
            lambda: prune(tiny_vit(class_token=False, global_pool="avg"), Routing.ppt(8, (1,), 1e-4)),
            "routing rule 0: field 'score' is 'cls_value', which reads the class token, but the model has none",
        ),
        (lambda: Routing.ppt(-1, (1,), 1e-4), "PPT's r must be an integer >= 0 (tokens removed per layer), got r=-1"),
        (lambda: Routing.ppt(8, (1,), 1e-4, num_tokens=0), "PPT's num_tokens must be an integer >= 1, got"),
        (
            lambda: Routing.ppt(8, ("1", 2), 1e-4, num_tokens=16),
            "routing rule 0: field 'layer' must be a block index >= 0, got '1'",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_field(make, message):
    with pytest.raises(UserError) as error:
        make()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
