"""benchmarks/throughput.py on a tiny model: the JSON it writes, its output check, and the README summary."""

import json
from pathlib import Path

import pytest

from attnprune.errors import UserError
from benchmarks import throughput

ROW_KEYS = {"model", "dtype", "mode", "batch", "routing", "gflops", "ms", "speedup", "efficiency"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("throughput") / "throughput_gpu.json"
    argv = ["--smoke", "--modes", "eager", "--backend", "eager"]  # compiled modes: test_inference.py
    throughput.main([*argv, "--out", str(out)])
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no partial record left once it succeeded
    return json.loads(out.read_text()), out


def test_writes_every_routing_side_by_side(smoke):
    result, _ = smoke
    assert {"device", "torch", "rows"} <= set(result) and "CPU" in result["device"]
    rows = result["rows"]
    assert all(ROW_KEYS <= set(row) for row in rows)
    assert {(r["mode"], r["batch"]) for r in rows} == {("eager", 1), ("eager", 4)}
    for mode in ("eager",):
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
    expected = {(r, "eager") for r in throughput.ROUTINGS}
    assert {(c["routing"], c["mode"]) for c in checks} == expected
    assert all(c["ok"] and c["max_abs_diff"] <= 1e-4 for c in checks)


def test_summary_names_the_device(smoke, capsys):
    result, out = smoke
    throughput.main(["--summarize", str(out)])
    table = capsys.readouterr().out
    assert result["device"] in table and "| tiny | float32 | 4 |" in table


def test_summary_of_the_rows_timed_with_other_reducers(smoke, tmp_path, capsys):
    """A step timed with the reference reducers (time:...:reference) is summarized with ``--impl reference`` alone."""
    result, _ = smoke
    reference = [{**row, "impl": "reference", "ms": row["ms"] * 2} for row in result["rows"] if row["batch"] == 4]
    path = tmp_path / "both.json"
    path.write_text(json.dumps({**result, "rows": result["rows"] + reference}))
    throughput.main(["--summarize", str(path)])
    assert "| tiny | float32 | 1 |" in capsys.readouterr().out
    throughput.main(["--summarize", str(path), "--impl", "reference"])
    table = capsys.readouterr().out
    unpruned = next(r for r in reference if r["routing"] == "unpruned")
    assert "| tiny | float32 | 1 |" not in table and f"| tiny | float32 | 4 | {unpruned['ms']:.2f} (eager) |" in table


def test_best_mode_of_each_model_and_efficiency_against_the_unpruned_in_its_best_mode():
    def row(mode, routing, ms, flops_ratio=0.5):
        ratio = 1.0 if routing == "unpruned" else flops_ratio
        return {
            "model": "m",
            "dtype": "bfloat16",
            "batch": 64,
            "mode": mode,
            "routing": routing,
            "ms": ms,
            "flops_ratio": ratio,
        }

    rows = [row("eager", "unpruned", 10.0), row("cudagraph", "unpruned", 8.0), row("eager", "tome", 6.0)]
    rows += [row("cudagraph", "tome", 5.0), row("regional-cudagraph", "tome", 4.4)]
    best = {r["routing"]: r for r in throughput.best_modes(rows)}
    assert best["unpruned"]["mode"] == "cudagraph" and best["tome"]["mode"] == "regional-cudagraph"
    assert best["tome"]["speedup"] == pytest.approx(8.0 / 4.4)
    assert best["tome"]["efficiency"] == pytest.approx(8.0 / 4.4 * 0.5)


def test_layers_scale_with_depth():
    assert throughput._layers(12, (3, 6, 9)) == [3, 6, 9]
    assert throughput._layers(4, (3, 6, 9)) == [1, 2, 3]
    assert [r.layer for r in throughput.layerwise(0.7, 12).rules] == [1, 4, 7]


def test_steps_parse_in_order_and_refuse_bad_specs():
    specs = ["time:bfloat16:cudagraph:1,64", "check:eager,cudagraph", "time:float32:eager:256:reference"]
    args = throughput.parse_args([f"--step={spec}" for spec in [*specs, "compile:regional:64:bfloat16"]])
    assert throughput.steps(args) == [
        ("time", "bfloat16", "cudagraph", [1, 64], "auto"),
        ("check", ["eager", "cudagraph"]),
        ("time", "float32", "eager", [256], "reference"),
        ("compile", "regional", 64, "bfloat16"),
    ]
    bad_specs = ("time:bfloat16:warp:1", "time:bfloat16:eager:1:triton", "check:fast", "compile:regional:64")
    for bad in (*bad_specs, "time:float32:eager:x", "time:float32:eager:0", "compile:full:1:float8"):
        with pytest.raises(UserError, match="expected check:MODE"):  # when parsed, before any model is built
            throughput.parse_args([f"--step={bad}"])


def test_compile_times_and_a_failing_step_is_recorded_not_fatal(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.write_text("{}")  # an earlier run's results, which a failed run leaves as they are
    # a CUDA-graph step on the CPU fails at its first call: recorded, and the next step still runs
    steps = ["--step=check:cudagraph,eager", "--step=time:float32:cudagraph:1", "--step=compile:full:2:float32"]
    with pytest.raises(SystemExit) as info:
        throughput.main(["--smoke", "--backend", "eager", *steps, "--out", str(out)])
    assert str(info.value) == (
        "error: 1 steps failed; some outputs differ from the PyTorch reference by more than 0.0001 (or failed): "
        f"{out} not written, the run is in {tmp_path / 'run.partial.json'}"
    )
    assert out.read_text() == "{}"
    result = json.loads((tmp_path / "run.partial.json").read_text())
    assert len(result["errors"]) == 1 and "CUDA" in result["errors"][0]["error"] and not result["rows"]
    checks = {(c["routing"], c["mode"]): c for c in result["checks"]}
    assert len(checks) == 8 and all(c["ok"] == (mode == "eager") for (_, mode), c in checks.items())
    assert "CUDA" in checks[("tome", "cudagraph")]["error"]
    assert [r["routing"] for r in result["compile"]] == list(throughput.ROUTINGS)
    assert all(r["compile_s"] > 0 and r["mode"] == "full" for r in result["compile"])
    table = throughput.summarize({**result, "rows": []})
    assert "| tiny | float32 | full | 2 | tome |" in table and "FAILED tiny" in capsys.readouterr().out


def test_the_models_of_other_libraries_are_converted_vits_of_deit_s_size(tmp_path):
    """transformers' ViT-S/16 and open_clip's ViT-S-16 tower, random and converted, beside timm's DeiT-S (the
    projection of the CLIP tower adds 0.15 MFLOPs)."""
    import timm

    from attnprune import count_flops

    args = throughput.parse_args(["--models", *throughput.LIBRARY_MODELS, "--out", str(tmp_path / "t.json")])
    assert args.models == list(throughput.LIBRARY_MODELS)
    deit_s = count_flops(timm.create_model("deit_small_patch16_224"))
    for name in throughput.LIBRARY_MODELS:
        assert count_flops(throughput.make_model(name)) == pytest.approx(deit_s, rel=1e-3), name
