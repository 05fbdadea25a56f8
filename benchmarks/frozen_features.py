"""How much a self-supervised backbone learned: k-NN, least-squares and logistic-regression readouts of its frozen
features, beside the same network at random initialisation (the baseline), on Fashion-MNIST validation images. The
logistic regression is fitted to convergence (L-BFGS), so it is the ceiling of any linear probe on these features and
the same training images without augmentation.

    .venv/bin/python benchmarks/frozen_features.py --backbone runs/fmnist-dino/backbone.safetensors

Prints one table and writes ``benchmarks/results/frozen_features_<name>.json``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnprune import load_model
from attnprune.atomic import check_output_dir, write_text_atomic
from attnprune.cli import ArgumentParser, model_source, positive_int, run_cli
from attnprune.io import build_from_spec
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.paradigms import knn_predict

CLASSES = len(FashionMNISTDataModule.CLASSES)


def logistic_top1(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor) -> float:
    """Top-1 of a multinomial logistic regression on standardised features, fitted by L-BFGS."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    classifier = torch.nn.Linear(train_x.shape[1], CLASSES)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(train_x), train_y) + 1e-5 * classifier.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (classifier(val_x).argmax(-1) == val_y).float().mean().item()


def readouts(model: torch.nn.Module, bank: list, val: list) -> dict[str, float]:
    """k-NN (k=20), least-squares linear and logistic-regression top-1 on ``val``, fitted on ``bank``."""
    train_x, train_y = torch.cat([model(x) for x, _ in bank]), torch.cat([y for _, y in bank])
    val_x, val_y = torch.cat([model(x) for x, _ in val]), torch.cat([y for _, y in val])
    knn = (knn_predict(val_x, train_x, train_y, CLASSES).argmax(-1) == val_y).float().mean().item()
    ones = torch.ones(len(train_x), 1)
    weights = torch.linalg.lstsq(torch.cat([train_x, ones], 1), F.one_hot(train_y, CLASSES).float()).solution
    linear = ((torch.cat([val_x, torch.ones(len(val_x), 1)], 1) @ weights).argmax(-1) == val_y).float().mean().item()
    logistic = logistic_top1(train_x, train_y, val_x, val_y)
    return {"knn_top1": knn, "linear_lstsq_top1": linear, "logistic_top1": logistic}


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--backbone", type=model_source, required=True, help="a headless backbone file (DINO: backbone.safetensors)"
    )
    parser.add_argument(
        "--bank_images", type=positive_int, default=5000, help="training images the readouts are fitted on"
    )
    parser.add_argument("--val_images", type=positive_int, default=2000)
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    check_output_dir(args.out_dir, "--out_dir")

    torch.manual_seed(0)
    trained = load_model(args.backbone)
    random_init = build_from_spec(trained.attnprune_spec).eval()
    data = FashionMNISTDataModule(batch_size=500).for_model(trained)
    data.setup()
    bank = list(itertools.islice(data.bank_dataloader(), -(-args.bank_images // 500)))
    val = data.take("validation", args.val_images)
    result = {
        "backbone": args.backbone,
        "bank_images": sum(len(y) for _, y in bank),
        "val_images": sum(len(y) for _, y in val),
        "trained": readouts(trained, bank, val),
        "random_init": readouts(random_init, bank, val),
    }
    print(f"{'features':14}{'k-NN top-1':>12}{'linear top-1':>14}{'logistic top-1':>16}")
    for name in ("trained", "random_init"):
        scores = result[name]
        print(
            f"{name:14}{scores['knn_top1']:>12.2%}{scores['linear_lstsq_top1']:>14.2%}{scores['logistic_top1']:>16.2%}"
        )
    path = args.out_dir / f"frozen_features_{Path(args.backbone).parent.name}.json"
    write_text_atomic(path, json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
