"""benchmarks/throughput.py on a tiny model: the JSON it writes, its output check, and the README summary."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import throughput  # noqa: E402

ROW_KEYS = {"model", "dtype", "mode", "batch", "routing", "gflops", "ms", "speedup", "efficiency"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("throughput") / "throughput_gpu.json"
    argv = ["--smoke", "--modes", "eager", "full", "--backend", "eager", "--check-modes", "eager", "full"]
    throughput.main([*argv, "--out", str(out)])
    return json.loads(out.read_text()), out


def test_writes_every_routing_side_by_side(smoke):
    result, _ = smoke
    assert {"device", "torch", "rows"} <= set(result) and "CPU" in result["device"]
    rows = result["rows"]
    assert all(ROW_KEYS <= set(row) for row in rows)
    assert {(r["mode"], r["batch"]) for r in rows} == {(m, b) for m in ("eager", "full") for b in (1, 4)}
    for mode in ("eager", "full"):
        for batch in (1, 4):
            group = {r["routing"]: r for r in rows if r["mode"] == mode and r["batch"] == batch}
            assert set(group) == set(throughput.ROUTINGS)
            base = group["unpruned"]
            assert base["speedup"] == 1.0 and base["efficiency"] == 1.0
            for row in group.values():
                assert row["speedup"] == pytest.approx(base["ms"] / row["ms"])
                assert row["efficiency"] == pytest.approx(row["speedup"] * row["gflops"] / base["gflops"])


def test_routings_share_one_flops_budget(smoke):
    result, _ = smoke
    ratios = {r["routing"]: r["flops_ratio"] for r in result["rows"] if r["mode"] == "eager" and r["batch"] == 1}
    assert ratios["unpruned"] == 1.0
    assert all(abs(ratios[name] - 0.65) < 0.05 for name in ("evit", "layerwise", "tome"))


def test_outputs_equal_the_reference(smoke):
    result, _ = smoke
    checks = result["checks"]
    expected = {(r, m) for r in throughput.ROUTINGS for m in ("eager", "full")}
    assert {(c["routing"], c["mode"]) for c in checks} == expected
    assert all(c["ok"] and c["max_abs_diff"] <= 1e-4 for c in checks)


def test_summary_names_the_device_and_picks_the_fastest_mode(smoke, capsys):
    result, out = smoke
    throughput.main(["--summarize", str(out)])
    table = capsys.readouterr().out
    assert result["device"] in table and "| tiny | float32 | 4 |" in table
    best = throughput.best_modes(result["rows"])
    for row in best:
        same = [r for r in result["rows"] if (r["batch"], r["routing"]) == (row["batch"], row["routing"])]
        assert row["ms"] == min(r["ms"] for r in same)


def test_layers_scale_with_depth():
    assert throughput._layers(12, (3, 6, 9)) == [3, 6, 9]
    assert throughput._layers(4, (3, 6, 9)) == [1, 2, 3]
    assert [r.layer for r in throughput.layerwise(0.7, 12).rules] == [1, 4, 7]


def test_group_option_parses_and_refuses_bad_specs():
    args = throughput.parse_args(["--group", "bfloat16:cudagraph:1,64", "--group", "float32:eager:256"])
    assert throughput.groups(args) == [("bfloat16", "cudagraph", [1, 64]), ("float32", "eager", [256])]
    with pytest.raises(SystemExit):
        throughput.groups(throughput.parse_args(["--group", "bfloat16:warp:1"]))
