"""Quickstart: shipped Fashion-MNIST ViTs, unpruned and pruned by ToMe, EViT, uniform attention top-k, PiToMe and a
layer-wise routing at matched FLOPs, evaluated on the test split: GFLOPs, top-1 and measured images/s. Where
``benchmarks/results/routings/<model>-<ratio>.yaml`` exists (written by benchmarks/pareto.py), the routing searched on
validation images for that budget is evaluated too.

By default it shows two tables: the supervised model at 60% of the FLOPs, every routing, and the MAE model at 50%,
where the search pays (unpruned, the two strongest baselines there and the searched routing). ``--model`` and
``--ratio`` evaluate one model at one budget instead, every routing.

    bash scripts/quickstart.sh                          # set up, then run this
    .venv/bin/python quickstart.py --model checkpoints/fmnist_mae.safetensors --ratio 0.5

Without the shipped checkpoints (or with --model random-deit-s) it prunes a randomly initialised DeiT-S instead:
cost only, no accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch

from attnprune import Routing, count_flops, load_model, match_flops, prune
from attnprune.cli import ArgumentParser, run_cli
from attnprune.errors import UserError, check_finite_outputs
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.routing import baseline_layers
from attnprune.routing.baselines import matched_baselines
from attnprune.timing import time_interleaved

# relative to the repository root, where the quickstart runs
SHIPPED = Path("checkpoints") / "fmnist_supervised.safetensors"
SEARCHED = Path("benchmarks") / "results" / "routings"
MATCH_TOLERANCE = 0.02  # of the unpruned FLOPs: how far a matched routing may be from the budget
# the default tables: (model, FLOPs budget, the routings shown: None for all)
CASES = (
    (SHIPPED, 0.6, None),
    (Path("checkpoints") / "fmnist_mae.safetensors", 0.5, ("unpruned", "tome", "pitome", "searched")),
)


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    """The options, checked: a bad one is a ValueError/FileNotFoundError naming it (see :mod:`attnprune.cli`)."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", help=f"weights file, hub name, or random-deit-s (default with --ratio: {SHIPPED})")
    parser.add_argument("--ratio", type=float, help="FLOPs budget as a fraction of the unpruned model (default 0.6)")
    parser.add_argument("--test_images", type=int, help="test images (default: all 10,000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds for images/s")
    args = parser.parse_args(args)
    args.default_cases = args.model is None and args.ratio is None
    args.model = str(SHIPPED) if args.model is None else args.model
    args.ratio = 0.6 if args.ratio is None else args.ratio
    if not (0 < args.ratio <= 1):  # also refuses nan
        raise UserError(f"--ratio must be a FLOPs fraction in (0, 1], got {args.ratio}")
    if args.test_images is not None and args.test_images < 1:
        raise UserError(f"--test_images must be at least 1, got {args.test_images}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.model != "random-deit-s" and args.model != str(SHIPPED):  # only the default falls back to a random model
        path = Path(args.model)
        if path.is_dir():
            raise IsADirectoryError(f"--model {args.model!r} is a directory; expected a weights file or a hub name")
        if path.suffix in {".safetensors", ".pth", ".bin", ".ckpt"} and not path.is_file():
            raise FileNotFoundError(
                f"--model {args.model!r} does not exist (a weights file, hub name or random-deit-s)"
            )
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    cases = [(str(path), ratio, shown) for path, ratio, shown in CASES if path.is_file()] if args.default_cases else []
    for model_path, ratio, shown in cases or [(args.model, args.ratio, None)]:
        evaluate_case(model_path, ratio, shown, args)
    print(f"done in {time.perf_counter() - start:.0f} s")


def evaluate_case(model_path: str, ratio: float, shown: tuple[str, ...] | None, args: argparse.Namespace) -> None:
    """Print one table: the model at ``model_path`` under each routing (the ``shown`` ones) at ``ratio`` of FLOPs."""
    shipped = model_path != "random-deit-s" and (Path(model_path).is_file() or not model_path.endswith(".safetensors"))
    if shipped:
        model = load_model(model_path)
    else:
        print("no shipped checkpoint found: pruning a randomly initialised DeiT-S (cost only, no accuracy)")
        torch.manual_seed(0)
        model = timm.create_model("deit_small_patch16_224").eval()
    base, depth = count_flops(model), len(model.blocks)
    routings = {"unpruned": Routing(), **matched_routings(model, ratio)}
    if shipped:
        data = FashionMNISTDataModule(batch_size=500).for_model(model)
        batches = data.take("test", args.test_images, "--test_images", default=10_000)
        check_finite_outputs(model(batches[0][0]), f"--model {model_path}")  # NaN logits: no top-1 to print
    else:
        batches = [(torch.randn(8, 3, 224, 224), None)]
    searched = SEARCHED / f"{Path(model_path).stem}-{ratio:g}.yaml"
    if shipped and searched.is_file():  # found on validation images by benchmarks/pareto.py
        routings["searched"] = Routing.from_yaml(searched)
    routings = {name: routing for name, routing in routings.items() if shown is None or name in shown}
    models = {
        name: prune(load_model(model_path) if shipped else timm.create_model("deit_small_patch16_224").eval(), routing)
        for name, routing in routings.items()
    }
    if not shipped:
        for copy in models.values():
            copy.load_state_dict(model.state_dict())
    images = batches[0][0]
    seconds = time_interleaved(models, images, warmup=1, repeats=args.repeats)

    name = Path(model_path).stem if shipped else "deit_small_patch16_224 (random init)"
    print(
        f"\n{name} at {ratio:.0%} of the FLOPs, test split ({sum(len(x) for x, _ in batches)} images), float32, "
        f"{torch.get_num_threads()} CPU threads, images/s at batch {len(images)}"
    )
    print(f"{'routing':16}{'GFLOPs':>9}{'FLOPs':>7}{'tokens left':>13}{'top-1 %':>9}{'img/s':>10}{'speedup':>9}")
    top1 = {}
    for key, routing in routings.items():
        flops = count_flops(model, routing)
        tokens = routing.token_counts(depth, model.patch_embed.num_patches)[-1]
        if shipped:
            top1[key] = sum((models[key](x).argmax(-1) == y).sum().item() for x, y in batches) / sum(
                len(y) for _, y in batches
            )
        print(
            f"{key:16}{flops / 1e9:>9.4f}{flops / base:>7.0%}{tokens:>13}"
            f"{f'{100 * top1[key]:.2f}' if key in top1 else '-':>9}"
            f"{len(images) / seconds[key]:>10.0f}{seconds['unpruned'] / seconds[key]:>9.2f}"
        )
    if "searched" in top1:
        print(f"searched: {searched} (benchmarks/pareto.py, validation images): {_verdict(routings['searched'], top1)}")


def matched_routings(model: torch.nn.Module, ratio: float) -> dict[str, Routing]:
    """The baselines (without the random control) and a layer-wise routing, each tuned to ``ratio`` of the FLOPs.

    Raises:
        UserError: one of them cannot come within :data:`MATCH_TOLERANCE` of ``ratio`` (a table at "matched FLOPs"
            would compare routings far apart); the message gives what each reaches and the lowest ratio all do.
    """
    base, layers, knobs = count_flops(model), baseline_layers(len(model.blocks)), [k / 100 for k in range(20, 101)]
    routings = {name: r for name, r in matched_baselines(model, ratio * base).items() if name != "random"}
    routings["layerwise"] = match_flops(model, lambda k: Routing.layerwise(k, layers), knobs, ratio)
    reached = {name: count_flops(model, routing) / base for name, routing in routings.items()}
    off = {name: value for name, value in reached.items() if abs(value - ratio) > MATCH_TOLERANCE}
    if off:
        cheapest = [r for name, r in matched_baselines(model, 0.0).items() if name != "random"]
        cheapest.append(Routing.layerwise(knobs[0], layers))
        lowest = max(count_flops(model, routing) / base for routing in cheapest)
        closest = ", ".join(f"{name} {value:.1%}" for name, value in off.items())
        raise UserError(
            f"--ratio {ratio:g}: not every routing comes within {100 * MATCH_TOLERANCE:g} points of {ratio:.0%} of "
            f"the FLOPs (the closest: {closest}), so the table would compare them at different FLOPs; give a --ratio "
            f"from {lowest:.2f} to 1"
        )
    return routings


def _verdict(searched: Routing, top1: dict[str, float]) -> str:
    """One line on what the searched row is: a baseline the held-out check returned, or the routing found, and its
    margin over the best baseline shown."""
    best = max((name for name in top1 if name not in ("unpruned", "searched")), key=top1.get)
    margin = 100 * (top1["searched"] - top1[best])
    if searched.name != "searched":
        return (
            f"the held-out check returned {searched.name}'s own schedule: the routing found was not shown better "
            f"than it on held-out validation images ({margin:+.2f} points against {best} here)"
        )
    return f"the routing the search found, {margin:+.2f} points against the best baseline shown ({best})"


def run() -> None:
    """The ``attnprune-quickstart`` console script: :func:`main` on ``sys.argv``, one line and exit status 2 on a user
    error."""
    run_cli(main)
