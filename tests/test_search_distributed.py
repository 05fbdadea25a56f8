"""The data-parallel search (attnprune.search.distributed): two gloo ranks, started as torchrun starts them (the
process-group variables in the environment), search the shipped supervised model on 45 Fashion-MNIST validation
images, which two ranks cannot split evenly, and find what one process finds: the same per-image values, routing,
report losses and held-out decision, for every strategy; a search killed at one world size resumes at the other to the
same routing; a state of other images is refused by name on every rank; a rank that fails stops every rank with the
same message instead of a hang. search.py under torchrun writes the routing one process writes.

The two ranks run every scenario in one spawn (starting them costs more than the scenarios), each writing what it got
to a JSON file; the tests compare those with the same scenarios run here, in one process."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from attnprune import Routing, load_model
from attnprune.cli import run_cli
from attnprune.cli.search import main
from attnprune.errors import UserError
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.search import Evaluator, SearchSpace, search_routing, split_holdout
from attnprune.search.distributed import Shard, share
from attnprune.search.state import SearchState
from attnprune.search.strategy import RateOptions
from tests.conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "checkpoints" / "fmnist_supervised.safetensors"
WORLD = 2
IMAGES = 45  # 31 searched (16 on rank 0, 15 on rank 1) and 14 held out (7 each), in batches of 16, 16 and 13
SPACE = SearchSpace(
    scorers=("l2_norm", "cls_attention"), reducers=("drop", "fuse", "merge"), keeps=(0.7,), merge_keeps=(0.8,)
)
SETTINGS = {"space": SPACE, "screen_images": 16, "progress": False}  # screening on the first 16 searched images
CONFIDENCE = {0.6: 0.95, 0.9: 0.5}  # at 0.6 ToMe is returned; at 0.9 (the mean difference decides) the routing found
# 3 images a step, the ranks' parts (seed 0): 2 + 1, 2 + 1, 3 + 0, 2 + 1, 1 + 2, 0 + 3 (rank 0 adds the FLOPs penalty)
RATES = RateOptions(steps=6, batch_size=3, granularity=8)
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def validation_images() -> Batches:
    model = load_model(MODEL)
    return FashionMNISTDataModule(batch_size=16).for_model(model).take("validation", IMAGES)


def outcome(run) -> dict:
    """What ``run()`` gave: the routing and report of a search, or the user error it raised."""
    try:
        result = run()
    except UserError as error:
        return {"error": str(error), "type": type(error).__name__, "rank": getattr(error, "rank", None)}
    return {"routing": result.routing.to_dict(), "report": result.report}


class Killed(Exception):
    """Stands for the signal that stops every rank of a search."""


def killed_after_two_steps(batches: Batches, path: Path) -> int:
    """A search with a state file, every rank stopped after its second checkpoint; the step saved (once every rank
    has stopped)."""
    original, calls = SearchState.checkpoint, []

    def checkpoint(self, *args) -> None:
        original(self, *args)
        calls.append(1)
        if len(calls) == 2:
            raise Killed

    SearchState.checkpoint = checkpoint
    try:
        search_routing(load_model(MODEL), batches, 0.6, state_path=path, **SETTINGS)
    except Killed:
        if dist.is_initialized():
            dist.barrier()  # rank 0 saves after the others may have stopped
        return json.loads(path.read_text())["step"]
    finally:
        SearchState.checkpoint = original
    raise AssertionError("the search was not stopped")


def per_image_losses(batches: Batches) -> dict:
    """The per-image KL of one routing on the searched images: all of them, the first 16; the first 20 images."""
    searched, _ = split_holdout(batches, 0.3)
    local, shard = share(searched, "searched")
    evaluator = Evaluator(load_model(MODEL), local, "kl", shard)
    routing = Routing.from_dict({"rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5, "reduce": "fuse"}]})
    values = {n: evaluator.per_image(evaluator.initial(), routing, 0, n)["kl"].tolist() for n in (16, None)}
    first = evaluator.first_images(20)
    return {"all": values[None], "first_16": values[16], "images": evaluator.images, "first_20": first.tolist()}


def scenarios(batches: Batches) -> dict:
    """The scenarios every world size runs alike, in the same order on every rank."""
    model = load_model(MODEL)
    results = {"per_image": per_image_losses(batches)}
    for budget, confidence in CONFIDENCE.items():
        search = {"confidence": confidence, **SETTINGS}
        results[f"beam-{budget}"] = outcome(lambda b=budget, s=search: search_routing(model, batches, b, **s))
    results["transition"] = outcome(lambda: search_routing(model, batches, 0.6, strategy="transition", **SETTINGS))
    tiny = tiny_vit(in_chans=1, num_classes=10)  # the selectivity analysis of the shipped model takes 15 s
    results["label_free"] = outcome(lambda: search_routing(tiny, batches, 0.6, strategy="label_free", **SETTINGS))
    diffrate = {"strategy": "diffrate", "rates": RATES, **SETTINGS}
    results["diffrate"] = outcome(lambda: search_routing(model, batches, 0.6, **diffrate))
    nan = [(x.clone(), y) for x, y in batches]
    nan[0][0][1] = math.nan  # image 1: rank 1's
    results["nan"] = outcome(lambda: search_routing(model, nan, 0.6, **SETTINGS))
    return results


def cli_error(args: list[str]) -> dict:
    """What search.py prints on stderr and exits with, run in this process."""
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        run_cli(main, args)
    except SystemExit as exit:
        return {"code": exit.code, "stderr": sys.stderr.getvalue()}
    finally:
        sys.stderr = stderr
    raise AssertionError("search.py did not fail")


def worker(rank: int, ports: list[int], folder: Path, batches: Batches) -> None:
    """One of two ranks: the scenarios, then resuming the state one process left after two steps, the same state
    refused for other images, and a search of the two ranks stopped after two steps; last, search.py given a bad
    setting, with the process group its own."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0]), "RANK": str(rank), "WORLD_SIZE": str(WORLD)}
    os.environ.update(env, LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        results = scenarios(batches)
        model, state = load_model(MODEL), folder / "killed-in-one-process.json"
        results["resumed"] = outcome(lambda: search_routing(model, batches, 0.6, state_path=state, **SETTINGS))
        fewer = batches[:2]
        results["other_images"] = outcome(lambda: search_routing(model, fewer, 0.6, state_path=state, **SETTINGS))
        results["killed"] = killed_after_two_steps(batches, folder / "killed-at-two-ranks.json")
        one_held_out = {**SETTINGS, "holdout": 0.05}  # of the first 16 images: 15 searched, 1 held out
        results["too_few"] = outcome(lambda: search_routing(model, batches[:1], 0.6, **one_held_out))
    finally:
        dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(ports[1])
    args = ["--model", str(MODEL), "--data.class_path", "attnprune.lit.data.FashionMNISTDataModule"]
    results["cli_error"] = cli_error([*args, "--budget", "0.6", "--val_images", "16", "--confidence", "1.5"])
    (folder / f"rank-{rank}.json").write_text(json.dumps(results))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def batches() -> Batches:
    return validation_images()


@pytest.fixture(scope="module")
def runs(batches, tmp_path_factory) -> tuple[dict, list[dict]]:
    """The scenarios in one process and on each of two ranks."""
    folder = tmp_path_factory.mktemp("distributed")
    assert killed_after_two_steps(batches, folder / "killed-in-one-process.json") == 2
    args = (free_ports(2), folder, batches)
    processes = mp.start_processes(worker, args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 300 s")
    ranks = [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in range(WORLD)]
    single = scenarios(batches)
    state = folder / "killed-at-two-ranks.json"
    single["resumed"] = outcome(lambda: search_routing(load_model(MODEL), batches, 0.6, state_path=state, **SETTINGS))
    single["refused"] = outcome(lambda: search_routing(load_model(MODEL), batches, 0.8, state_path=state, **SETTINGS))
    return single, ranks


def test_shares_are_dealt_as_a_distributed_sampler_deals_them():
    """Rank 1 of 2 holds images 1, 3, 5, ... of a set; of the first 16 it holds 8, of the first 3 one."""
    shard = Shard(31, rank=1, size=2, offset=10)
    assert shard.count() == 15 and shard.count(16) == 8 and shard.count(3) == 1 and shard.count(1) == 0
    assert Shard(31, rank=0, size=2).count() == 16 and shard.position(0) == 11 and shard.position(2) == 15
    assert shard.local(torch.tensor([4, 7, 1, 30, 29])).tolist() == [3, 0, 14]
    batches = [(torch.arange(3), None)]
    assert share(batches, "searched") == (batches, Shard(3))  # one process keeps the batches as they are


def test_every_image_is_scored_once_in_image_order(runs):
    single, ranks = runs
    one = single["per_image"]
    assert len(one["all"]) == one["images"] == 31 and len(one["first_16"]) == 16
    for rank in ranks:
        assert rank["per_image"]["images"] == 31
        assert rank["per_image"]["all"] == pytest.approx(one["all"], abs=1e-6)
        assert rank["per_image"]["first_16"] == pytest.approx(one["first_16"], abs=1e-6)
        assert rank["per_image"]["first_20"] == one["first_20"]  # the images themselves, gathered exactly
    assert max(one["all"]) > 0.01  # values a summation-order error of 1e-6 would not hide


def losses(report: dict) -> dict[str, float]:
    """Every loss of a report by a path of keys: the searched images', before the fill, and the held-out check's."""
    found = {key: value for key, value in report.items() if key.startswith("val_")}
    found |= {f"before_fill/{k}": v for k, v in report.get("before_fill", {}).items() if k.startswith("val_")}
    check = report.get("check", {})
    for method, metrics in check.get("holdout", {}).items():
        found |= {f"holdout/{method}/{name}": value for name, value in metrics.items()}
    for method, paired in check.get("paired", {}).items():
        found |= {f"paired/{method}/{name}": value for name, value in paired.items()}
    return found


@pytest.mark.parametrize("scenario", ["beam-0.6", "beam-0.9", "transition", "label_free", "diffrate"])
def test_two_ranks_find_what_one_process_finds(runs, scenario):
    single, ranks = runs
    one, first, second = single[scenario], ranks[0][scenario], ranks[1][scenario]
    for key in ("wall_time_s", "world_size"):
        assert first["report"].pop(key) >= 0 and second["report"].pop(key) >= 0
    assert first == second  # every rank took every decision alike
    assert first["routing"] == one["routing"]
    assert one["report"].pop("world_size") == 1 and losses(one["report"])
    assert losses(first["report"]) == pytest.approx(losses(one["report"]), abs=1e-6)
    for key in ("candidates_evaluated", "images", "flops", "forward_backward_passes"):
        assert first["report"][key] == one["report"][key]
    assert first["report"]["block_passes"] == pytest.approx(one["report"]["block_passes"], rel=1e-12)
    check = one["report"]["check"]
    assert first["report"]["check"]["returned"] == check["returned"] and check["holdout_images"] == 14
    assert first["report"]["check"]["searched_routing"] == check["searched_routing"]
    if scenario == "diffrate":  # the learned schedule and its relaxed FLOPs, before the move within budget
        assert first["report"]["rate_schedule"] == one["report"]["rate_schedule"]
        assert first["report"]["relaxed_flops_ratio"] == pytest.approx(one["report"]["relaxed_flops_ratio"], abs=1e-9)
    if scenario.startswith("beam"):  # both decisions: the routing found kept at 0.9, ToMe returned at 0.6
        assert check["returned"] == ("searched" if scenario == "beam-0.9" else "tome")


def test_a_search_killed_at_one_world_size_resumes_at_the_other(runs):
    """Killed after two steps in one process, resumed on two ranks; killed after two steps on two ranks, resumed in
    one process: both end with the routing of the search never killed, having done the same work."""
    single, ranks = runs
    assert ranks[0]["killed"] == ranks[1]["killed"] == 2
    full = single["beam-0.6"]
    for resumed in (single["resumed"], ranks[0]["resumed"], ranks[1]["resumed"]):
        assert resumed["routing"] == full["routing"]
        assert resumed["report"]["val_kl"] == pytest.approx(full["report"]["val_kl"], abs=1e-6)
        assert resumed["report"]["candidates_evaluated"] == full["report"]["candidates_evaluated"]


def test_a_state_of_another_search_is_refused_by_name_on_every_rank(runs):
    """As one process refuses a state of another budget, both ranks refuse one of other images; and a set of images
    that two ranks cannot share is refused on both."""
    single, ranks = runs
    state = Path(single["refused"]["error"].split()[2])
    assert single["refused"]["error"] == (
        f"search state {state} belongs to another search (it was searched with budget 0.6, this search has 0.8); "
        "delete it or pass another state_path"
    )
    errors = [rank["other_images"] for rank in ranks]
    assert [error["rank"] for error in errors] == [0, 1] and {error["type"] for error in errors} == {"AllRanksError"}
    assert errors[0]["error"] == errors[1]["error"]
    assert "belongs to another search (it searched other images or labels (31 images, fingerprint" in errors[0]["error"]
    assert "; this search: 22, " in errors[0]["error"]  # the first two batches: 32 images, 22 searched
    message = "the held-out images (1) are fewer than the 2 ranks: each rank needs one"
    assert [rank["too_few"] for rank in ranks] == [{"error": message, "type": "UserError", "rank": None}] * 2


def test_a_failing_rank_stops_every_rank_with_one_message(runs):
    """Image 1 is rank 1's: its NaN outputs stop rank 1, and rank 0 with it, with the message one process gives.
    search.py prints a user error once, on rank 0, and every rank exits with status 2."""
    single, ranks = runs
    message = single["nan"]["error"]
    assert message.startswith("the searched model: the model's outputs on validation image 1 hold 10 non-finite")
    assert single["nan"]["type"] == "UserError"
    for rank, result in enumerate(ranks):
        assert result["nan"] == {"error": message, "type": "AllRanksError", "rank": rank}
    printed = "error: search confidence must be in [0.5, 1), got 1.5 (--debug or ATTNPRUNE_DEBUG=1 for a traceback)\n"
    assert [rank["cli_error"] for rank in ranks] == [{"code": 2, "stderr": printed}, {"code": 2, "stderr": ""}]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 search.py ARGS`` on the CPU, one thread per rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD)]
    command += ["--master_port", str(free_ports(1)[0]), str(ROOT / "search.py"), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_search_command_under_torchrun_writes_what_one_process_writes(batches, tmp_path):
    """torchrun --nproc_per_node 2 search.py: rank 0 alone prints and writes the routing and the report, which are
    the routing and the losses of search_routing in one process on the same images."""
    out = tmp_path / "routing.yaml"
    args = ["--model", str(MODEL), "--data.class_path", "attnprune.lit.data.FashionMNISTDataModule"]
    args += ["--data.init_args.batch_size", "16", "--budget", "0.8", "--strategy", "transition"]
    args += ["--val_images", str(IMAGES), "--output", str(out)]
    done = torchrun([*args, "--confidence", "0.5"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("searching on the first 45 images") == 1 and done.stdout.count("rules:") == 1
    one = search_routing(load_model(MODEL), batches, 0.8, strategy="transition", confidence=0.5, progress=False)
    report = json.loads(out.with_suffix(".json").read_text())
    assert yaml.safe_load(out.read_text()) == one.routing.to_dict() and report["world_size"] == 2
    assert losses(report) == pytest.approx(losses(one.report), abs=1e-6)


def test_diffrate_refuses_a_model_off_the_cpu(batches):
    model = load_model(MODEL).to("meta")  # as a model on a GPU: the rate search keeps its logits on the CPU
    message = "^search strategy 'diffrate' runs on the CPU only, got a model on meta; use strategy 'beam'$"
    with pytest.raises(UserError, match=message):
        search_routing(model, batches, 0.6, strategy="diffrate", progress=False)
