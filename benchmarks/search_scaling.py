"""Data-parallel scaling of the routing search on the cores of one machine: the same search at world size 1 with one
and with two threads and at world size 2 with one thread per rank (two gloo processes, as ``torchrun
--nproc_per_node 2`` starts them), wall time side by side, and what the cores allow at best: two independent
one-thread searches at once (no process group), whose slowdown against one alone is what sharing the machine (memory
bandwidth, caches) costs any two processes.

Each run is a fresh process (or two) given the same model and validation images; the ranks meet at a barrier before
the search, and the time is the search's own (``report["wall_time_s"]``, rank 0's). Prints one table and writes
``benchmarks/results/search_scaling.json`` (the reports, the ratio of the wall times at world size 2 and 1, the
speed-ups over one thread, the ceiling: twice one thread's time over the concurrent searches' time, and whether the
routings agree). Run it with both cores free:

    .venv/bin/python benchmarks/search_scaling.py --model checkpoints/fmnist_supervised.safetensors --budget 0.6 \\
        --images 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnprune import load_model
from attnprune.atomic import check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, fraction, model_source, positive_int, run_cli
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.search import search_routing

RUNS = {"1 rank x 1 thread": (1, 1), "1 rank x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1)}
CONCURRENT = "2 searches x 1 thread at once"  # each of the full search, no process group


def rank_main(rank: int, world: int, threads: int, port: int, args: argparse.Namespace, batches, out: Path) -> None:
    """One rank: the search, its report written by rank 0; at world size 0, two independent searches (both write)."""
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    if world == 0:
        result = search_routing(load_model(args.model), batches, args.budget, progress=False)
        write_text_atomic(out.with_name(f"{out.stem}-{rank}.json"), json.dumps({"report": result.report}))
        return
    if world > 1:
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
        os.environ.update(env, LOCAL_RANK=str(rank))
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
        dist.barrier()  # the ranks start the search together
    result = search_routing(load_model(args.model), batches, args.budget, progress=False)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        write_text_atomic(out, json.dumps({"routing": result.routing.to_dict(), "report": result.report}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=model_source, default="checkpoints/fmnist_supervised.safetensors")
    parser.add_argument("--budget", type=fraction, default=0.6)
    parser.add_argument(
        "--images", type=positive_int, default=5000, help="Fashion-MNIST validation images (30%% held out)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_scaling.json")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")
    model = load_model(args.model)
    batches = FashionMNISTDataModule(batch_size=500).for_model(model).take("validation", args.images)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (world, threads) in RUNS.items():
            out = Path(folder) / f"{world}.json"
            options = (world, threads, free_port(), args, batches, out)
            mp.start_processes(rank_main, options, nprocs=world, join=True, start_method="spawn")
            results[name] = json.loads(out.read_text())
        out = Path(folder) / "concurrent.json"
        mp.start_processes(rank_main, (0, 1, 0, args, batches, out), nprocs=2, join=True, start_method="spawn")
        concurrent = [json.loads(out.with_name(f"concurrent-{rank}.json").read_text())["report"] for rank in (0, 1)]
    both = max(report["wall_time_s"] for report in concurrent)
    (single, one, two) = (results[name]["report"]["wall_time_s"] for name in RUNS)
    same = len({json.dumps(r["routing"], sort_keys=True) for r in results.values()}) == 1
    print(f"{args.model}, budget {args.budget:g}, {args.images} validation images, {platform.machine()} CPU")
    print(f"{'run':30}{'wall s':>9}{'candidates':>12}{'val KL':>10}{'returned':>16}")
    for name, run in results.items():
        r = run["report"]
        returned = r["check"]["returned"] if "check" in r else "searched"
        print(f"{name:30}{r['wall_time_s']:>9.1f}{r['candidates_evaluated']:>12}{r['val_kl']:>10.5f}{returned:>16}")
    print(f"{CONCURRENT:30}{both:>9.1f}  (each the whole search)")
    print(f"world size 2 / world size 1: {two / one:.2f}x the wall time; same routing: {same}")
    print(
        f"speed-up over one thread: {single / one:.2f}x with two threads, {single / two:.2f}x with two ranks; "
        f"at most {2 * single / both:.2f}x (two searches at once)"
    )
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "budget": args.budget,
        "images": args.images,
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "ratio": two / one,
        "speedup_two_threads": single / one,
        "speedup_two_ranks": single / two,
        "speedup_ceiling": 2 * single / both,
        "same_routing": same,
        "runs": {
            name: {"world_size": world, "threads_per_rank": threads, **results[name]}
            for name, (world, threads) in RUNS.items()
        },
        "concurrent": {"processes": 2, "threads_per_process": 1, "wall_time_s": [r["wall_time_s"] for r in concurrent]},
    }
    write_text_atomic(args.out, json.dumps(record, indent=2))


if __name__ == "__main__":
    run_cli(main)
