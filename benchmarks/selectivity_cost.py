"""What SelectivityCallback adds to a validation epoch on DeiT-T (224 px, 197 tokens, 12 blocks).

Times ``trainer.validate`` of a DeiT-T classifier (random init: the cost does not depend on the weights) on the same
images, in one process. Writes ``benchmarks/results/selectivity_cost.json``.

    nice -n 10 python benchmarks/selectivity_cost.py --images 64 --oracle_images 1

Without the callback; with its default (at most 15% of the epoch's images, at most 64); with a fixed count
(``--max_images``, no fraction), which gives the cost of one analysed image in validation images; with the oracle.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from attnprune.atomic import check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, positive_int, run_cli
from attnprune.lit.backbone import Backbone
from attnprune.lit.callbacks import SelectivityCallback
from attnprune.lit.modules import PrunedClassifier

OUT = Path(__file__).resolve().parent / "results" / "selectivity_cost.json"


def validate_seconds(module: L.LightningModule, loader: DataLoader, callback: SelectivityCallback | None) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[callback] if callback else [],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.validate(module, loader, verbose=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="a timm architecture (random init)")
    parser.add_argument("--images", type=positive_int, default=64, help="validation images (the epoch)")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument(
        "--max_images", type=positive_int, default=64, help="images of the fixed-count run (max_fraction off)"
    )
    parser.add_argument("--oracle_images", type=int, default=1, help="images analysed with the oracle (0: skip)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not timm.is_model(args.model):
        parser.error(f"--model {args.model} is not a timm architecture")
    if args.oracle_images < 0:
        parser.error(f"--oracle_images must be at least 0, got {args.oracle_images}")
    check_output_file(args.out, "--out")

    torch.manual_seed(0)
    module = PrunedClassifier(Backbone(model=args.model, num_classes=1000)).eval()
    images = torch.randn(args.images, 3, 224, 224)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 1000, (args.images,))), batch_size=args.batch_size)
    validate_seconds(module, loader, None)  # warm-up (allocator, thread pools)

    plain = validate_seconds(module, loader, None)
    default = SelectivityCallback()
    with_default = validate_seconds(module, loader, default)
    fixed = SelectivityCallback(max_images=args.max_images, max_fraction=None)
    with_fixed = validate_seconds(module, loader, fixed)
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "images": args.images,
        "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "validation_epoch_s": round(plain, 2),
        "default_callback": {
            "max_images": default.max_images,
            "max_fraction": default.max_fraction,
            "images_analysed": default.seen,
            "analysis_s": round(default.seconds, 2),
            "validation_epoch_with_callback_s": round(with_default, 2),
            "ratio_to_validation_epoch": round(default.seconds / plain, 2),
        },
        "fixed_count_callback": {
            "max_images": args.max_images,
            "images_analysed": fixed.seen,
            "analysis_s": round(fixed.seconds, 2),
            "validation_epoch_with_callback_s": round(with_fixed, 2),
            "ratio_to_validation_epoch": round(fixed.seconds / plain, 2),
            "validation_images_per_analysed_image": round((fixed.seconds / fixed.seen) / (plain / args.images), 2),
        },
    }
    if args.oracle_images:
        oracle = SelectivityCallback(max_images=args.oracle_images, oracle=True)
        with_oracle = validate_seconds(module, loader, oracle)
        result["oracle_callback"] = {
            "max_images": args.oracle_images,
            "images_analysed": oracle.seen,
            "analysis_s": round(oracle.seconds, 2),
            "validation_epoch_with_callback_s": round(with_oracle, 2),
            "seconds_per_image": round(oracle.seconds / oracle.seen, 2),
        }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_cli(main)
