"""How much the routing search flatters its own pick: top-1 on the validation images it searched against the held-out
ones, with the unpruned model on both as the yardstick (the halves may differ in difficulty).

Reads ``benchmarks/results/pareto_<model>.json`` (written by ``pareto.py`` with ``--holdout``), takes the routing the
search found at each budget (whether or not the held-out check returned it), evaluates it on the same two halves of
the validation split, prints one table and writes ``benchmarks/results/search_optimism_<model>.json``.

    .venv/bin/python benchmarks/search_optimism.py --model checkpoints/fmnist_supervised.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pareto import top1

from attnprune import Routing, load_model
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.search import split_holdout

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a shipped model that pareto.py has been run on")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    name = Path(args.model).stem
    pareto = RESULTS / f"pareto_{name}.json"
    if not pareto.is_file():
        raise SystemExit(f"{pareto} not found: run benchmarks/pareto.py --model {args.model} first")
    rows = [r for r in json.loads(pareto.read_text())["results"] if r["method"] == "searched"]
    if not all("check" in r["search"] for r in rows):
        raise SystemExit(f"{pareto} was searched without --holdout: there are no held-out images to compare with")

    model = load_model(args.model)
    first = rows[0]["search"]
    images = first["images"] + first["check"]["holdout_images"]
    batches = FashionMNISTDataModule(batch_size=500).for_model(model).take("validation", images)
    searched, held_out = split_holdout(batches, first["check"]["holdout_images"] / images)
    result = {
        "model": name,
        "unpruned": {"searched": top1(model, Routing(), searched), "held_out": top1(model, Routing(), held_out)},
        "found": [],
    }
    print(f"{name}: top-1 on the {first['images']} searched / {first['check']['holdout_images']} held-out images")
    print(f"{'routing':>16} {'searched':>9} {'held out':>9} {'gap':>6}")
    unpruned = result["unpruned"]
    print(f"{'unpruned':>16} {unpruned['searched']:>9.2%} {unpruned['held_out']:>9.2%} {'':>6}")
    for row in rows:
        routing = Routing.from_dict(row["search"]["check"]["searched_routing"])
        found = {"budget": row["budget"], "searched": top1(model, routing, searched)}
        found["held_out"] = top1(model, routing, held_out)
        result["found"].append(found)
        gap = found["searched"] - found["held_out"]
        label = f"found at {row['budget']:.0%}"
        print(f"{label:>16} {found['searched']:>9.2%} {found['held_out']:>9.2%} {100 * gap:>+6.2f}")
    out = RESULTS / f"search_optimism_{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
