"""Export the best validation epoch of a ``train.py`` run as a weights file with a card, for the models that exist
only to test the search on (``benchmarks/models/``; the shipped models have ``scripts/make_checkpoints.py``).

    .venv/bin/python scripts/export_model.py --run runs/fmnist-gen-d6-cls \\
        --config configs/fashion_mnist/generalization/d6_cls.yaml --out benchmarks/models/fmnist_gen_d6_cls.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from make_checkpoints import best_checkpoint, test_top1  # the sibling script: python puts scripts/ on the path

from attnprune import count_flops, load_model, save_model
from attnprune.atomic import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the run folder (holding checkpoints/)")
    parser.add_argument("--config", required=True, help="the train.py config that made it (recorded in the card)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    ckpt = best_checkpoint(args.run / "checkpoints")
    model = load_model(ckpt)
    spec = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["model_spec"]
    kwargs = {**spec["model_kwargs"], "num_classes": model.num_classes}
    card = {
        "name": args.out.stem,
        "paradigm": spec.get("paradigm", "supervised"),
        "architecture": spec["architecture"],
        "model_kwargs": kwargs,
        "command": f"python train.py fit --config {args.config}",
        "export_command": f"python scripts/export_model.py --run {args.run} --config {args.config} --out {args.out}",
        "purpose": "trained only to test the routing search on a model nobody tuned it on "
        "(benchmarks/search_generalization.py); not a shipped model",
        "data": "Fashion-MNIST: 55,000 training images; validation = the shipped models' 5,000 (data seed 0); "
        "tested on the 10,000 test images",
        "source_checkpoint": ckpt.name,
        "test_top1": test_top1(model),
        "gflops": count_flops(model) / 1e9,
        "params": sum(p.numel() for p in model.parameters()),
    }
    save_model(model, args.out, spec["architecture"], card["paradigm"], kwargs, card=card)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    print(f"{args.out}: test top-1 {card['test_top1']:.2%}, {card['gflops']:.4f} GFLOPs")


if __name__ == "__main__":
    main()
