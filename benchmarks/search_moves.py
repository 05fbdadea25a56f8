"""Do the peers' reducers help the search as moves? The search with the 2022 moves alone (drop, fuse, merge) against
the default search, whose space adds DiffRate's ``absorb`` and PiToMe's ``energy_merge``, with the default screening
and with more of it, side by side in one run on the same validation images.

Prints one table (wall time, candidates evaluated, KL on the searched images, the routing found's KL on the held-out
images and ToMe's there, which routing the held-out check returned, the reducers of the routing found) and writes
``benchmarks/results/search_moves.json``.

    .venv/bin/python benchmarks/search_moves.py --model checkpoints/fmnist_mae.safetensors --budget 0.5
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from attnprune import load_model
from attnprune.atomic import check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, fraction, model_source, positive_int, run_cli
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.search import SearchSpace, search_routing

VARIANTS = {
    "2022 moves only": (SearchSpace(reducers=("drop", "fuse", "merge")), {}),
    "default (with the peers' moves)": (SearchSpace(), {}),
    "default, screen 512, 6 finalists": (SearchSpace(), {"screen_images": 512, "finalists": 6}),
}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=model_source, required=True)
    parser.add_argument("--budget", type=fraction, default=0.5)
    parser.add_argument("--val_images", type=positive_int, default=2500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_moves.json")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    batches = FashionMNISTDataModule(batch_size=500).for_model(model).take("validation", args.val_images)
    rows = []
    for name, (space, options) in VARIANTS.items():
        start = time.perf_counter()
        report = search_routing(model, batches, args.budget, space=space, progress=False, **options).report
        check = report["check"]
        rows.append(
            {
                "variant": name,
                "wall_s": time.perf_counter() - start,
                "candidates": report["candidates_evaluated"],
                "val_kl": report["val_kl"],
                "found_holdout_kl": check["holdout"]["searched"]["loss"],
                "tome_holdout_kl": check["holdout"]["tome"]["loss"],
                "returned": check["returned"],
                "found_reducers": sorted({rule["reduce"] for rule in check["searched_routing"]["rules"]}),
                "found_routing": check["searched_routing"],
            }
        )
    print(f"{args.model}, budget {args.budget:g}, {args.val_images} validation images (30% held out)")
    print(f"{'variant':34}{'wall s':>8}{'cand.':>7}{'val KL':>9}{'held-out KL':>13}{'ToMe there':>12}  returned")
    for r in rows:
        print(
            f"{r['variant']:34}{r['wall_s']:>8.0f}{r['candidates']:>7}{r['val_kl']:>9.4f}{r['found_holdout_kl']:>13.4f}"
            f"{r['tome_holdout_kl']:>12.4f}  {r['returned']} ({', '.join(r['found_reducers'])})"
        )
    write_text_atomic(args.out, json.dumps({"model": args.model, "budget": args.budget, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
