"""Cost of one budget's routing search (default settings), with and without prefix caching, side by side in one run.

Prints one table (wall time, candidates evaluated, block passes over the searched images, validation KL and top-1)
and writes ``benchmarks/results/search_cost.json``; both runs must find the same routing. The default search keeps
30% of the ``--val_images`` out of the search for its held-out check.

    .venv/bin/python benchmarks/search_cost.py --model checkpoints/fmnist_supervised.safetensors --budget 0.6
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from attnprune import load_model
from attnprune.atomic import check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, fraction, model_source, positive_int, run_cli
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.search import search_routing


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=model_source, required=True)
    parser.add_argument("--budget", type=fraction, default=0.6)
    parser.add_argument("--val_images", type=positive_int, default=5000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_cost.json")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    batches = FashionMNISTDataModule(batch_size=500).for_model(model).take("validation", args.val_images)
    runs = {
        mode: search_routing(model, batches, args.budget, prefix_cache=mode == "cached")
        for mode in ("cached", "uncached")
    }
    same = runs["cached"].routing == runs["uncached"].routing
    print(
        f"{args.model}, budget {args.budget:g}, {args.val_images} validation images, "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"{'mode':10}{'wall s':>9}{'candidates':>12}{'block passes':>14}{'val KL':>9}{'val top-1':>11}")
    for mode, run in runs.items():
        r = run.report
        print(
            f"{mode:10}{r['wall_time_s']:>9.1f}{r['candidates_evaluated']:>12}{r['block_passes']:>14.0f}"
            f"{r['val_kl']:>9.4f}{r['val_top1']:>11.2%}"
        )
    speedup = runs["uncached"].report["wall_time_s"] / runs["cached"].report["wall_time_s"]
    print(f"prefix caching: {speedup:.2f}x faster, same routing: {same}")
    write_text_atomic(
        args.out,
        json.dumps(
            {
                "model": args.model,
                "budget": args.budget,
                "val_images": args.val_images,
                "speedup": speedup,
                "same_routing": same,
                "runs": {m: r.report for m, r in runs.items()},
                "routing": runs["cached"].routing.to_dict(),
            },
            indent=2,
        ),
    )


if __name__ == "__main__":
    run_cli(main)
