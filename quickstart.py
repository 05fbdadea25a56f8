"""Quickstart: prune a DeiT-S with several routings at equal FLOPs; print GFLOPs and measured images/s.

Until the shipped Fashion-MNIST models exist, the model is randomly initialised: this shows cost, not accuracy.

    bash scripts/quickstart.sh            # set up, then run this
    .venv/bin/python quickstart.py --batch 16 --ratio 0.6
"""

from __future__ import annotations

import argparse

import timm
import torch

from attnprune import Routing, count_flops, match_flops, prune
from attnprune.bench import time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--ratio", type=float, default=0.65, help="FLOPs budget as a fraction of the unpruned model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    depth = len(model.blocks)
    keeps = [k / 100 for k in range(30, 100)]
    routings = {
        "unpruned": Routing(),
        "tome": match_flops(model, lambda r: Routing.tome(int(r), depth), range(1, 30), args.ratio),
        "evit": match_flops(model, lambda k: Routing.evit(keep=k), keeps, args.ratio),
        "topk_attention": match_flops(model, lambda k: Routing.topk_attention(k, (3, 6, 9)), keeps, args.ratio),
        "layerwise-example": Routing.from_yaml("configs/routing/layerwise_example.yaml"),
    }
    models = {name: prune(timm.create_model(args.model).eval(), routing) for name, routing in routings.items()}
    for model_ in models.values():
        model_.load_state_dict(model.state_dict())
    seconds = time_interleaved(models, torch.randn(args.batch, 3, 224, 224), warmup=1, repeats=args.repeats)

    base = count_flops(model)
    print(f"\n{args.model} (random init), batch {args.batch}, float32, {torch.get_num_threads()} CPU threads")
    print(f"{'routing':20}{'GFLOPs':>8}{'FLOPs':>8}{'tokens left':>13}{'img/s':>9}{'speedup':>9}")
    for name, routing in routings.items():
        flops = count_flops(model, routing)
        tokens = routing.token_counts(depth, model.patch_embed.num_patches)[-1]
        print(
            f"{name:20}{flops / 1e9:>8.2f}{flops / base:>8.0%}{tokens:>13}{args.batch / seconds[name]:>9.1f}"
            f"{seconds['unpruned'] / seconds[name]:>9.2f}"
        )


if __name__ == "__main__":
    main()
