"""Quickstart: a shipped Fashion-MNIST ViT, unpruned and pruned by ToMe, EViT, uniform attention top-k and a
layer-wise routing at matched FLOPs, evaluated on the test split: GFLOPs, top-1 and measured images/s. Where
``benchmarks/results/routings/<model>-<ratio>.yaml`` exists (written by benchmarks/pareto.py), the routing searched on
validation images for that budget is evaluated too.

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
from attnprune.cli import run_cli
from attnprune.errors import UserError, check_finite_outputs
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.routing import baseline_layers
from attnprune.routing.baselines import matched_baselines
from attnprune.timing import time_interleaved

# relative to the repository root, where the quickstart runs
SHIPPED = Path("checkpoints") / "fmnist_supervised.safetensors"
SEARCHED = Path("benchmarks") / "results" / "routings"


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    """The options, checked: a bad one is a ValueError/FileNotFoundError naming it (see :mod:`attnprune.cli`)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, exit_on_error=False
    )
    parser.add_argument("--model", default=str(SHIPPED), help="weights file, hub name, or random-deit-s")
    parser.add_argument("--ratio", type=float, default=0.6, help="FLOPs budget as a fraction of the unpruned model")
    parser.add_argument("--test_images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds for images/s")
    args = parser.parse_args(args)
    if not (0 < args.ratio <= 1):  # also refuses nan
        raise UserError(f"--ratio must be a FLOPs fraction in (0, 1], got {args.ratio}")
    if args.test_images < 1:
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
    shipped = args.model != "random-deit-s" and (Path(args.model).is_file() or not args.model.endswith(".safetensors"))
    if shipped:
        model = load_model(args.model)
        batches = FashionMNISTDataModule(batch_size=500).for_model(model).take("test", args.test_images)
        check_finite_outputs(model(batches[0][0]), f"--model {args.model}")  # NaN logits: no top-1 to print
    else:
        print("no shipped checkpoint found: pruning a randomly initialised DeiT-S (cost only, no accuracy)")
        torch.manual_seed(0)
        model = timm.create_model("deit_small_patch16_224").eval()
        batches = [(torch.randn(8, 3, 224, 224), None)]
    base = count_flops(model)
    depth = len(model.blocks)
    routings = {"unpruned": Routing(), **matched_baselines(model, args.ratio * base)}
    routings.pop("random")
    routings["layerwise"] = match_flops(
        model, lambda k: Routing.layerwise(k, baseline_layers(depth)), [k / 100 for k in range(20, 91)], args.ratio
    )
    searched = SEARCHED / f"{Path(args.model).stem}-{args.ratio:g}.yaml"
    if shipped and searched.is_file():  # found on validation images by benchmarks/pareto.py
        routings["searched"] = Routing.from_yaml(searched)
    models = {
        name: prune(load_model(args.model) if shipped else timm.create_model("deit_small_patch16_224").eval(), routing)
        for name, routing in routings.items()
    }
    if not shipped:
        for copy in models.values():
            copy.load_state_dict(model.state_dict())
    images = batches[0][0]
    seconds = time_interleaved(models, images, warmup=1, repeats=args.repeats)

    name = Path(args.model).stem if shipped else "deit_small_patch16_224 (random init)"
    print(
        f"\n{name}, test split ({sum(len(x) for x, _ in batches)} images), float32, "
        f"{torch.get_num_threads()} CPU threads, images/s at batch {len(images)}"
    )
    print(f"{'routing':16}{'GFLOPs':>9}{'FLOPs':>7}{'tokens left':>13}{'top-1':>9}{'img/s':>10}{'speedup':>9}")
    for key, routing in routings.items():
        flops = count_flops(model, routing)
        tokens = routing.token_counts(depth, model.patch_embed.num_patches)[-1]
        top1 = "-"
        if shipped:
            correct = sum((models[key](x).argmax(-1) == y).sum().item() for x, y in batches)
            top1 = f"{correct / sum(len(y) for _, y in batches):.2%}"
        print(
            f"{key:16}{flops / 1e9:>9.4f}{flops / base:>7.0%}{tokens:>13}{top1:>9}"
            f"{len(images) / seconds[key]:>10.0f}{seconds['unpruned'] / seconds[key]:>9.2f}"
        )
    if "searched" in routings:
        print(f"searched: {searched} (benchmarks/pareto.py, validation images)")
    print(f"done in {time.perf_counter() - start:.0f} s")


def run() -> None:
    """The ``attnprune-quickstart`` console script: :func:`main` on ``sys.argv``, one line and exit status 2 on a user
    error."""
    run_cli(main)
