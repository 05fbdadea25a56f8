"""Every benchmark script refuses an invalid argument as the entry points do (:func:`attnprune.cli.run_cli`): one line
on stderr, exit status 2, no traceback, before it reads any image, and the committed results (``benchmarks/results/``,
``configs/``) stay as they were. Each script runs as a user runs it, from an empty working directory, which stays
empty."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, script_env

SHIPPED = str(ROOT / "checkpoints" / "fmnist_supervised.safetensors")
MISSING = "missing.safetensors"
NOT_FOUND = f"{MISSING} does not exist; expected a weights file, checkpoint or hub name"

CASES = [
    # (script, arguments, the error line without its "error: " and its debugging hint)
    ("check_policy.py", ["--confidences", "0.3"], "search confidence must be in [0.5, 1), got 0.3"),
    (
        "check_policy.py",
        ["--models", SHIPPED, "--search_seed", "1"],
        "--search_seed 1 is also in --judge_seeds: judge on draws not searched on",
    ),
    ("claims.py", ["--models", f"[{MISSING}]"], f"--models: {NOT_FOUND}"),
    (
        "frozen_features.py",
        ["--backbone", SHIPPED, "--val_images", "0"],
        "argument --val_images: expected an integer of at least 1, got 0",
    ),
    (
        "objective_stability.py",
        ["--models", SHIPPED, "--budget", "1.5"],
        "argument --budget: expected a fraction in (0, 1], got 1.5",
    ),
    (
        "pareto.py",
        ["--model", SHIPPED, "--budgets", "0.9", "1.5"],
        "argument --budgets: expected a fraction in (0, 1], got 1.5",
    ),
    (
        "pareto.py",
        ["--summarize", str(ROOT / "benchmarks/results/pareto_fmnist_mae.json"), "--recheck", "1"],
        "search confidence must be in [0.5, 1), got 1.0",
    ),
    ("search_cost.py", ["--model", MISSING], f"argument --model: {NOT_FOUND}"),
    (
        "search_generalization.py",
        ["--models", SHIPPED, "--split_seeds", "-1"],
        "--split_seeds must be distinct integers of at least 0 (each a draw), got [-1]",
    ),
    (
        "search_generalization.py",
        ["--models", SHIPPED, "--reuse", "earlier.json"],
        "--reuse earlier.json does not exist; expected a search_generalization.json",
    ),
    (
        "search_moves.py",
        ["--model", SHIPPED, "--val_images", "-5"],
        "argument --val_images: expected an integer of at least 1, got -5",
    ),
    (
        "search_optimism.py",
        ["--model", str(ROOT / "checkpoints")],
        f"argument --model: {ROOT / 'checkpoints'} is a directory; expected a weights file, checkpoint or hub name",
    ),
    (
        "search_scaling.py",
        ["--model", SHIPPED, "--images", "0"],
        "argument --images: expected an integer of at least 1, got 0",
    ),
    ("selectivity_cost.py", ["--oracle_images", "-1"], "--oracle_images must be at least 0, got -1"),
    (
        "throughput.py",
        ["--smoke", "--step", "time:float32:warp:1"],
        "--step 'time:float32:warp:1': expected "
        "check:MODE[,MODE...], time:DTYPE:MODE:BATCHES[:IMPL] or compile:MODE:BATCH:DTYPE (modes ('eager', "
        "'cudagraph', 'regional', 'regional-cudagraph', 'full'), impls ('auto', 'reference', 'fused'))",
    ),
    # a budget below what the search space reaches: refused once the model is loaded, before any search
    (
        "pareto.py",
        ["--model", SHIPPED, "--budgets", "0.9", "0.01"],
        "--budgets 0.01: below the cheapest routing the search space reaches, 18.1% of the unpruned model's FLOPs",
    ),
    ("throughput.py", ["--models", "tiny", "--ratio", "0"], "argument --ratio: expected a fraction in (0, 1], got 0"),
]


def committed_changes() -> set[str]:
    """``git status`` of the committed results and configs: what differs there from the last commit."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", "benchmarks/results", "configs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(status.stdout.splitlines())


def _case_id(script: str, args: list[str], message: str) -> str:
    """The script and the option it refuses (the last one given): ``pareto--budgets``."""
    return script.removesuffix(".py") + next(arg for arg in reversed(args) if arg.startswith("--"))


def test_every_benchmark_script_has_a_case():
    assert {case[0] for case in CASES} == {path.name for path in (ROOT / "benchmarks").glob("*.py")}


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize(("script", "args", "message"), CASES, ids=[_case_id(*case) for case in CASES])
def test_a_benchmark_refuses_an_invalid_argument_in_one_line_and_writes_nothing(tmp_path, script, args, message):
    before = committed_changes()  # others may be changing files at the same time: only this run's difference counts
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=tmp_path,
        env=script_env(PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: {message} (--debug or ATTNPRUNE_DEBUG=1 for a traceback)"]
    assert result.stdout == ""
    assert committed_changes() == before
    assert list(tmp_path.iterdir()) == []  # nor anything in the working directory (runs/, a state)
