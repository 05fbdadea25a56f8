"""How stable is each search objective's ranking of candidates between two disjoint sets of images?

The candidates are the routings the beam search screens at its first steps: every rule of the default
``SearchSpace`` at each pruning layer, completed by ToMe merging within the budget (a seeded sample of them). Each is
scored on two disjoint halves of validation images (the size the search screens on) by the KL divergence from the
unpruned model and by top-1; the Spearman correlation of the two halves' scores says how much of each objective's
ranking is signal rather than the luck of the images. Prints one table, writes
``benchmarks/results/objective_stability.json``.

    .venv/bin/python benchmarks/objective_stability.py --models checkpoints/fmnist_*.safetensors
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from attnprune import Routing, count_flops, load_model
from attnprune.atomic import check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, fraction, model_source, positive_int, run_cli
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.search import Evaluator, SearchSpace
from attnprune.search.space import completion
from attnprune.selectivity.functional import spearman

RESULTS = Path(__file__).parent / "results"
BATCH = 250  # images per batch; each half is whole batches


def candidates(model: torch.nn.Module, budget: float, count: int, seed: int) -> list[Routing]:
    """A seeded sample of ``count`` first-step candidates of the default space, each completed within budget."""
    space = SearchSpace()
    layers = space.pruning_layers(len(model.blocks))
    target = budget * count_flops(model, Routing())
    pool = []
    for i, layer in enumerate(layers):
        for rule in space.candidates(layer, model.has_class_token, depth=len(model.blocks)):
            routing = completion(model, [rule] if rule is not None else [], layers[i + 1 :], target)
            if routing is not None:
                pool.append(routing)
    return random.Random(seed).sample(pool, min(count, len(pool)))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=model_source, nargs="+", required=True)
    parser.add_argument("--budget", type=fraction, default=0.6)
    parser.add_argument("--candidates", type=positive_int, default=60)
    parser.add_argument("--half_images", type=positive_int, default=500, help=f"images in each half (x {BATCH})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "objective_stability.json")
    args = parser.parse_args(argv)
    if args.half_images % BATCH:
        parser.error(f"--half_images must be a multiple of {BATCH} (the batch size), got {args.half_images}")
    check_output_file(args.out, "--out")
    torch.set_grad_enabled(False)
    rows = []
    print(f"Spearman correlation of candidate scores between two disjoint halves of {args.half_images} images")
    print(f"{'model':28}{'candidates':>11}{'KL':>8}{'top-1':>8}")
    for path in args.models:
        model = load_model(path)
        batches = FashionMNISTDataModule(batch_size=BATCH).for_model(model).take("validation", 2 * args.half_images)
        cut = args.half_images // BATCH
        halves = [Evaluator(model, part, "kl") for part in (batches[:cut], batches[cut:])]
        routings = candidates(model, args.budget, args.candidates, args.seed)
        scores = {"kl": [[], []], "top1": [[], []]}
        for routing in routings:
            for half, evaluator in enumerate(halves):
                metrics = evaluator.measure(evaluator.initial(), routing, 0)
                scores["kl"][half].append(metrics["kl"])
                scores["top1"][half].append(metrics["top1"])
        row = {"model": Path(path).stem, "budget": args.budget, "candidates": len(routings)}
        for name, (first, second) in scores.items():
            row[f"spearman_{name}"] = spearman(torch.tensor(first), torch.tensor(second)).item()
        rows.append(row)
        print(f"{row['model']:28}{len(routings):>11}{row['spearman_kl']:>8.3f}{row['spearman_top1']:>8.3f}", flush=True)
    write_text_atomic(args.out, json.dumps({"half_images": args.half_images, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
