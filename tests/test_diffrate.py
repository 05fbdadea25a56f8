"""DiffRate: ``Routing.diffrate`` against the official OpenGVLab/DiffRate patches, the ``absorb`` reducer by hand,
the preset's rules, its schedule loader, FLOPs and errors."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from attnprune import Routing, count_flops, prune
from attnprune.errors import UserError
from attnprune.reduction import REDUCERS
from attnprune.reduction.diffrate import absorb
from tests.conftest import assert_matches_official, tiny_vit
from tests.diffrate_reference import CASES, FIXTURE, seeded_images, seeded_vit
from tests.test_flops import measured_macs

MIRROR = Path("/work/.mirror/OpenGVLab+DiffRate/repo")  # a read-only copy of the official repository, where present


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_official_implementation(case):
    reference = load_file(FIXTURE)[case]
    spec = CASES[case]
    model = seeded_vit(case)
    with torch.no_grad():
        unpruned = model(seeded_images(case))
        ours = prune(model, Routing.diffrate(spec["prune_kept"], spec["merge_kept"]))(seeded_images(case))
    assert_matches_official(ours, unpruned, reference)


def test_fixture_holds_the_cases_of_its_script():
    with safe_open(FIXTURE, "pt") as fixture:
        assert json.loads(fixture.metadata()["cases"]) == CASES
        assert sorted(fixture.keys()) == sorted(CASES)


# --- absorb by hand: one prefix token and five patch tokens of width 2 per image; the metric is the tokens -----------

PREFIX = torch.tensor([[[2.0, 1.0]], [[0.0, 1.0]]])  # each as similar as can be to a merged token: never a destination
PATCHES = torch.tensor(
    [
        [[1.0, 0.0], [0.0, 2.0], [2.0, 1.0], [1.0, 2.0], [4.0, 0.0]],
        [[5.0, 4.0], [0.0, 1.0], [1.0, 4.0], [0.0, 3.0], [1.0, 0.0]],
    ]
)
SCORES = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.2, 0.5, 0.4]])
SIZES = torch.tensor([[1.0, 1.0, 1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])[..., None]


def _absorb(n_pruned: int, size: torch.Tensor | None = SIZES) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([PREFIX, PATCHES], dim=1)
    return absorb(x, size, 2, 1, scores=SCORES, metric=x, n_pruned=n_pruned)


def test_absorb_prunes_then_merges_into_the_most_similar_kept_token():
    x, size = _absorb(n_pruned=4)
    root5, root17 = math.sqrt(5), math.sqrt(17)
    # image 0 keeps patches 0 and 1 (scores 0.5, 0.4), prunes patch 4 (0.1); patch 2 = (2, 1) joins patch 0
    # (cosine 2/sqrt5 against 1/sqrt5), patch 3 = (1, 2) joins patch 1; means are plain, sizes grow by similarity
    # image 1 keeps patches 3 and 4 (0.5, 0.4) in their original order, prunes patch 0 (0.1); patches 1 = (0, 1)
    # (cosine 1) and 2 = (1, 4) (cosine 4/sqrt17) both join patch 3 = (0, 3)
    expected_x = torch.tensor(
        [
            [[2.0, 1.0], [1.5, 0.5], [0.5, 2.0]],
            [[0.0, 1.0], [1 / 3, 8 / 3], [1.0, 0.0]],
        ]
    )
    expected_size = torch.tensor(
        [[1.0, 1.0 + 2.0 * 2 / root5, 1.0 + 1.0 * 2 / root5], [1.0, 1.0 + 1.0 + 4 / root17, 1.0]]
    )[..., None]
    torch.testing.assert_close(x, expected_x)
    torch.testing.assert_close(size, expected_size)


def test_absorb_without_pruning_merges_every_further_token():
    x, size = _absorb(n_pruned=5)  # n_pruned == n_in: nothing is pruned
    # image 0: patch 4 = (4, 0) (cosine 1 with patch 0) joins patch 0 as well; image 1: patch 0 = (5, 4) joins
    # patch 4 = (1, 0) (cosine 5/sqrt41 against 4/sqrt41 with patch 3)
    root5, root17, root41 = math.sqrt(5), math.sqrt(17), math.sqrt(41)
    expected_x = torch.tensor(
        [
            [[2.0, 1.0], [7 / 3, 1 / 3], [0.5, 2.0]],
            [[0.0, 1.0], [1 / 3, 8 / 3], [3.0, 2.0]],
        ]
    )
    expected_size = torch.tensor(
        [[1.0, 1.0 + 2.0 * 2 / root5 + 1.0, 1.0 + 2 / root5], [1.0, 2.0 + 4 / root17, 1.0 + 5 / root41]]
    )[..., None]
    torch.testing.assert_close(x, expected_x)
    torch.testing.assert_close(size, expected_size)


def test_absorb_sizes_default_to_one_and_the_registry_calls_it():
    x, size = _absorb(n_pruned=4, size=None)
    assert torch.equal(size[:, 0], torch.ones(2, 1))
    torch.testing.assert_close(size[0, 1], torch.tensor([1.0 + 2 / math.sqrt(5)]))  # patch 2's size is now 1
    reducer = REDUCERS["absorb"]
    assert reducer.takes_score and reducer.metric == "tokens" and reducer.options == ("prune",) and reducer.averages
    tokens = torch.cat([PREFIX, PATCHES], dim=1)
    again = reducer(tokens, None, 2, 1, scores=SCORES, metric=tokens, n_pruned=4)
    assert torch.equal(again[0], x) and torch.equal(again[1], size)


def test_absorb_shrinks_a_size_by_a_negative_similarity_as_the_official_eval_code():
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [-1.0, 0.5]]])  # the merged token points away from the kept one
    out, size = absorb(x, None, 1, 1, scores=torch.tensor([[0.9, 0.1]]), metric=x, n_pruned=2)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0], [0.0, 0.25]]]))
    torch.testing.assert_close(size[0, 1], torch.tensor([1.0 - 1 / math.sqrt(1.25)]))


# --- the preset's rules -----------------------------------------------------------------------------------------------


def _rules(routing: Routing) -> list[dict]:
    return [rule.to_dict() for rule in routing.rules]


def test_preset_prunes_with_drop_and_merges_with_absorb():
    routing = Routing.diffrate([17, 14, 16, 10, 8], [17, 12, 15, 11, 6])
    assert routing.name == "diffrate" and routing.prop_attn
    assert _rules(routing) == [
        {"layer": 0, "score": "cls_attention", "keep": 16, "reduce": "drop"},  # the tokens the schedule is for
        {"layer": 1, "score": "cls_attention", "keep": 11, "reduce": "absorb", "prune": 13},
        # block 2: both counts rise above the 11 tokens left, nothing is reduced
        {"layer": 3, "score": "cls_attention", "keep": 9, "reduce": "drop"},  # merge count above the pruned tokens
        {"layer": 4, "score": "cls_attention", "keep": 5, "reduce": "absorb", "prune": 7},
    ]
    assert routing.token_counts(depth=5, num_tokens=16) == [16, 16, 11, 11, 9, 5]


def test_preset_gives_prune_only_where_pruning_removes_tokens():
    routing = Routing.diffrate([17, 17, 20, 12], [15, 12, 8, 8])
    assert _rules(routing) == [
        {"layer": 0, "score": "cls_attention", "keep": 14, "reduce": "absorb", "prune": 16},  # block 0 says 16
        {"layer": 1, "score": "cls_attention", "keep": 11, "reduce": "absorb"},
        {"layer": 2, "score": "cls_attention", "keep": 7, "reduce": "absorb"},  # the prune count is above the tokens
    ]  # block 3's counts (11 patch tokens after pruning, 7 after merging) remove none of the 7 left


def test_preset_token_counts_follow_the_official_minimum():
    """DiffRate's code counts the tokens after block l as min(tokens, prune_kept[l], merge_kept[l])."""
    for case, spec in CASES.items():
        tokens = (spec["img_size"] // spec["patch_size"]) ** 2
        official = [tokens + 1]
        for p, m in zip(spec["prune_kept"], spec["merge_kept"], strict=True):
            official.append(min(official[-1], p, m))
        routing = Routing.diffrate(spec["prune_kept"], spec["merge_kept"])
        assert routing.token_counts(spec["depth"], tokens) == [n - 1 for n in official], case


def test_first_count_is_the_models_tokens():
    routing = Routing.diffrate([50, 40, 30, 20], [50, 40, 30, 20])
    model = tiny_vit()  # 64 patch tokens: block 0 prunes them to the schedule's 49, as DiffRate's code does
    assert routing.token_counts(depth=4, num_tokens=64) == [64, 49, 39, 29, 19]
    with torch.no_grad():
        assert prune(model, routing)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match=r"routing rule 0: field 'keep' asks for 196 tokens but only 64") as err:
        prune(tiny_vit(), Routing.diffrate([197, 150, 100, 50], [197, 150, 100, 50]))
    assert "\n" not in str(err.value)


def test_yaml_round_trip(tmp_path):
    routing = Routing.diffrate([65, 60, 48, 40], [60, 52, 44, 40])
    path = tmp_path / "diffrate.yaml"
    routing.to_yaml(path)
    assert "prune: 59" not in path.read_text() and "prune: 47" in path.read_text()
    assert Routing.from_yaml(path) == routing


def test_count_flops_matches_torch_counter():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    for prune_kept, merge_kept in (
        ([65, 60, 48, 40], [60, 52, 44, 40]),  # merging in block 0, prune-and-merge, merge only, prune only
        ([65, 65, 70, 30], [65, 40, 30, 20]),
    ):
        routing = Routing.diffrate(prune_kept, merge_kept)
        analytic = count_flops(model, routing)
        assert analytic == pytest.approx(measured_macs(prune(model, routing), x), rel=0.02), routing
        assert analytic < 0.8 * count_flops(model, Routing())


def test_absorb_flops_by_hand():
    from attnprune.flops import reducer_flops

    # 64 patches pruned to 40, 30 kept: 10 merged tokens against 30 kept of width 48, then their averaging
    (plan,) = Routing.from_dict(
        {"rules": [{"layer": 1, "score": "cls_attention", "keep": 30, "prune": 40, "reduce": "absorb"}]}
    ).resolve(4, 64)
    assert (plan.n_in, plan.n_pruned, plan.n_keep, plan.n_out) == (64, 40, 30, 30)
    assert reducer_flops(plan, 65, 48, 16) == 10 * 30 * 48 + 10 * 48
    (plan,) = Routing.from_dict(
        {"rules": [{"layer": 1, "score": "cls_attention", "keep": 30, "reduce": "absorb"}]}
    ).resolve(4, 64)
    assert reducer_flops(plan, 65, 48, 16) == 34 * 30 * 48 + 34 * 48  # no pruning: every further token merges


# --- the schedule file ------------------------------------------------------------------------------------------------

SCHEDULES = {
    "ViT-X": {
        "2.9": {"prune_kept_num": "[65, 60, 48, 40]", "merge_kept_num": "[60, 52, 44, 40]"},
        "3.1": {"prune_kept_num": [65, 65, 60, 50], "merge_kept_num": [65, 60, 55, 45]},  # lists are read too
    },
    "CAFormer-X": {"5.2": {"prune_kept_num": "None", "merge_kept_num": "[196, 193, 137]"}},
}


@pytest.fixture
def schedule_file(tmp_path: Path) -> Path:
    path = tmp_path / "compression_rate.json"
    path.write_text(json.dumps(SCHEDULES))
    return path


def test_schedule_loads_a_budget_of_the_file(schedule_file):
    routing = Routing.diffrate_schedule(schedule_file, "ViT-X", 2.9)
    assert routing.rules == Routing.diffrate([65, 60, 48, 40], [60, 52, 44, 40]).rules
    assert routing.name == "diffrate-ViT-X-2.9" and routing.prop_attn
    assert Routing.diffrate_schedule(str(schedule_file), "ViT-X", "2.90") == routing
    assert (
        Routing.diffrate_schedule(schedule_file, "ViT-X", 3.1).rules
        == Routing.diffrate([65, 65, 60, 50], [65, 60, 55, 45]).rules
    )


def test_spec_reads_a_schedule(schedule_file):
    routing = Routing.parse(f"diffrate:file={schedule_file},model=ViT-X,gflops=2.9")
    assert routing == Routing.diffrate_schedule(schedule_file, "ViT-X", 2.9)
    with pytest.raises(UserError, match="needs gflops="):
        Routing.parse(f"diffrate:file={schedule_file},model=ViT-X")


def test_schedule_errors(schedule_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        Routing.diffrate_schedule(tmp_path / "missing.json", "ViT-X", 2.9)
    with pytest.raises(UserError, match=r"has no model 'ViT-Y' \(it has: ViT-X, CAFormer-X\)"):
        Routing.diffrate_schedule(schedule_file, "ViT-Y", 2.9)
    with pytest.raises(UserError, match=r"has no ViT-X schedule at 2.7 GFLOPs \(it has: 2.9, 3.1\)"):
        Routing.diffrate_schedule(schedule_file, "ViT-X", 2.7)
    with pytest.raises(UserError, match=r"gflops='much'"):
        Routing.diffrate_schedule(schedule_file, "ViT-X", "much")
    with pytest.raises(UserError, match="CAFormer-X at 5.2 GFLOPs: prune_kept_num must be a list .* not a ViT's"):
        Routing.diffrate_schedule(schedule_file, "CAFormer-X", 5.2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ViT-X": {"1.0": {"prune_kept_num": "[65, 0]", "merge_kept_num": "[65, 40]"}}}))
    with pytest.raises(UserError, match=r"ViT-X at 1.0 GFLOPs: DiffRate's prune_kept\[1\] must be an integer >= 2"):
        Routing.diffrate_schedule(bad, "ViT-X", 1)
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not JSON"):
        Routing.diffrate_schedule(bad, "ViT-X", 1)


@pytest.mark.skipif(not MIRROR.is_dir() or shutil.which("git") is None, reason="no copy of OpenGVLab/DiffRate here")
def test_every_published_schedule_loads(tmp_path):
    import timm

    path = tmp_path / "compression_rate.json"
    path.write_bytes(
        subprocess.run(
            ["git", "-C", MIRROR, "show", "HEAD:compression_rate.json"], capture_output=True, check=True
        ).stdout
    )
    schedules = json.loads(path.read_text())
    for model_key, budgets in schedules.items():
        for gflops, entry in budgets.items():
            if entry["prune_kept_num"] == "None":  # CAFormer: merging within its stages, not a ViT's schedule
                with pytest.raises(UserError, match="not a ViT's"):
                    Routing.diffrate_schedule(path, model_key, gflops)
                continue
            routing = Routing.diffrate_schedule(path, model_key, gflops)
            prune_kept, merge_kept = json.loads(entry["prune_kept_num"]), json.loads(entry["merge_kept_num"])
            official = [prune_kept[0]]
            for p, m in zip(prune_kept, merge_kept, strict=True):
                official.append(min(official[-1], p, m))
            assert routing.token_counts(len(prune_kept), prune_kept[0] - 1) == [n - 1 for n in official], gflops
    # DeiT-S's 2.9 GFLOPs schedule costs 2.9 GFLOPs here too (our count adds the scoring and merging)
    deit_small = timm.create_model("deit_small_patch16_224")
    assert count_flops(deit_small, Routing.diffrate_schedule(path, "ViT-S-DeiT", 2.9)) == pytest.approx(2.9e9, rel=0.01)


# --- bad arguments ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prune_kept", "merge_kept", "message"),
    [
        ([65, 50], [65], r"prune_kept and merge_kept need one count per block each, got 2 and 1"),
        ([], [], r"need one count per block each, got 0 and 0"),
        ([65, 0], [65, 40], r"prune_kept\[1\] must be an integer >= 2 .*got 0"),
        ([65, 1], [65, 40], r"prune_kept\[1\] must be an integer >= 2 .*got 1"),
        ([65, 50.5], [65, 40], r"prune_kept\[1\] must be an integer >= 2 .*got 50.5"),
        ([65, 50], [65, True], r"merge_kept\[1\] must be an integer >= 2 .*got True"),
    ],
)
def test_bad_counts_give_one_line_errors(prune_kept, merge_kept, message):
    with pytest.raises(UserError, match=message) as err:
        Routing.diffrate(prune_kept, merge_kept)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"keep": 30, "prune": 20}, r"routing rule 0: field 'prune' keeps 20 tokens by pruning but the rule keeps 30"),
        ({"keep": 30, "prune": 0}, r"routing rule 0: field 'prune' as a token count must be >= 1, got 0"),
        ({"keep": 30, "prune": 1.5}, r"routing rule 0: field 'prune' as a fraction must be in \(0, 1\]"),
        ({"keep": 30, "prune": 70}, r"routing rule 0: field 'prune' asks for 70 tokens but only 64"),
        ({"keep": 30, "prune": 40, "reduce": "drop"}, r"field 'prune' is not read by reduce 'drop' \(read by: absorb"),
        ({"keep": 30, "prune": 40, "reduce": "fuse"}, r"field 'prune' is not read by reduce 'fuse'"),
    ],
)
def test_bad_hand_written_rules_give_one_line_errors(rule, message):
    rule = {"layer": 1, "score": "cls_attention", "reduce": "absorb", **rule}
    with pytest.raises(UserError, match=message) as err:
        Routing.from_dict({"rules": [rule]}).resolve(4, 64)
    assert "\n" not in str(err.value)
