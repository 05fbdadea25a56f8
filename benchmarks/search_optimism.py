"""How much the routing search flatters its own pick: the routing found, on the validation images it was searched on
against the held-out ones, in the search's objective (KL divergence from the unpruned model) and in top-1.

The two halves may differ in difficulty, so each has a yardstick nobody chose on those images: ToMe at the same budget
for the KL (the unpruned model's is 0), the unpruned model for top-1. The optimism is the routing found's gap
(held-out minus searched KL) beyond ToMe's: what picking among hundreds of candidates on the searched images adds.

Reads ``benchmarks/results/pareto_<model>.json`` (written by ``pareto.py`` with ``--holdout``), takes the routing the
search found at each budget (whether or not the held-out check returned it), evaluates it on the same two halves of
the validation split, prints one table and writes ``benchmarks/results/search_optimism_<model>.json``.

    .venv/bin/python benchmarks/search_optimism.py --model checkpoints/fmnist_supervised.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnprune import Routing, count_flops, load_model
from attnprune.atomic import check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, model_source, run_cli
from attnprune.errors import UserError
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.routing.baselines import matched_baselines
from attnprune.search import split_holdout
from attnprune.search.evaluator import Evaluator

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", type=model_source, required=True, help="a shipped model that pareto.py has been run on"
    )
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    name = Path(args.model).stem
    pareto, out = RESULTS / f"pareto_{name}.json", RESULTS / f"search_optimism_{name}.json"
    if not pareto.is_file():
        raise FileNotFoundError(f"{pareto} not found: run benchmarks/pareto.py --model {args.model} first")
    rows = [r for r in json.loads(pareto.read_text())["results"] if r["method"] == "searched"]
    if not all("check" in r["search"] for r in rows):
        raise UserError(f"{pareto} was searched without --holdout: there are no held-out images to compare with")
    check_output_file(out, "the results file")

    model = load_model(args.model)
    first = rows[0]["search"]
    images = first["images"] + first["check"]["holdout_images"]
    batches = FashionMNISTDataModule(batch_size=500).for_model(model).take("validation", images)
    searched, held_out = split_holdout(batches, first["check"]["holdout_images"] / images)
    evaluators = {"searched": Evaluator(model, searched, "kl"), "held_out": Evaluator(model, held_out, "kl")}

    def measure(routing: Routing) -> dict[str, dict[str, float]]:
        return {half: e.measure(e.initial(), routing, 0) for half, e in evaluators.items()}

    def line(label: str, m: dict[str, dict[str, float]]) -> str:
        gap = 100 * (m["searched"]["top1"] - m["held_out"]["top1"])
        kl = f"{m['searched']['kl']:>12.4f} {m['held_out']['kl']:>9.4f}"
        return f"{label:>14} {m['searched']['top1']:>15.2%} {m['held_out']['top1']:>9.2%} {gap:>+6.2f} | {kl}"

    unpruned = measure(Routing())
    result = {"model": name, "unpruned": {half: m["top1"] for half, m in unpruned.items()}, "found": []}
    print(f"{name}: the {first['images']} searched / {first['check']['holdout_images']} held-out validation images")
    print(f"{'':>14} {'top-1 searched':>15} {'held out':>9} {'gap':>6} | {'KL searched':>12} {'held out':>9}")
    print(line("unpruned", unpruned))
    for row in rows:
        found = measure(Routing.from_dict(row["search"]["check"]["searched_routing"]))
        tome = measure(matched_baselines(model, row["budget"] * count_flops(model, Routing()), within=True)["tome"])
        gaps = [m["held_out"]["kl"] - m["searched"]["kl"] for m in (found, tome)]
        optimism = gaps[0] - gaps[1]
        result["found"].append({"budget": row["budget"], "found": found, "tome": tome, "kl_optimism": optimism})
        print(line(f"found at {row['budget']:.0%}", found))
        print(line(f"ToMe at {row['budget']:.0%}", tome) + f"   KL optimism beyond ToMe's gap {optimism:+.4f}")
    write_text_atomic(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
