"""Evaluate a model under one or more routings: a table of GFLOPs, top-1, top-5 and images/s.

A LightningCLI entry point configured by YAML under configs/ (model, data, trainer). The model's ``checkpoint`` is
a timm hub name, a local weights file or a Lightning checkpoint; ``--ckpt_path`` restores a whole module saved by
train.py (a linear probe with its head, say). Prints the table and writes ``results.json`` and ``results.csv`` to
``--output_dir``.

    python evaluate.py --config configs/fashion_mnist/evaluate.yaml \
        --routings '[unpruned, configs/routing/layerwise_example.yaml]'
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger

from attnprune.bench import time_interleaved
from attnprune.lit.cli import AttnpruneCLI, trainer_defaults
from attnprune.lit.modules import load_routing
from attnprune.vit import prune

COLUMNS = ("routing", "gflops", "top1", "top5", "images_per_s")


class EvaluateCLI(AttnpruneCLI):
    def add_arguments_to_parser(self, parser) -> None:  # no checkpointing or LR monitor: nothing is trained
        parser.add_argument(
            "--routings", type=list[str], default=["unpruned"], help="routing YAML files ('unpruned' for none)"
        )
        parser.add_argument("--output_dir", type=str, default="results/evaluate")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="a Lightning checkpoint of the whole module (weights of model and head)",
        )
        parser.add_argument("--throughput_repeats", type=int, default=5, help="timed rounds for images/s (0: skip)")


def routing_name(spec: str) -> str:
    return spec if spec == "unpruned" else load_routing(spec).name


def evaluate(cli: EvaluateCLI) -> list[dict[str, Any]]:
    config = cli.config
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if config.ckpt_path:
        module = type(module).load_from_checkpoint(config.ckpt_path, map_location="cpu")
    rows = []
    for spec in config.routings:
        routing = load_routing(spec)
        module.set_routing(routing)
        metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        rows.append(
            {
                "routing": routing_name(spec),
                "routing_spec": spec,
                "gflops": module.gflops(),
                "top1": metrics["test/top1"],
                "top5": metrics.get("test/top5"),
                "images_per_s": None,
            }
        )
    if config.throughput_repeats > 0 and trainer.is_global_zero:
        images, _ = next(iter(datamodule.test_dataloader()))
        backbones = {}
        for row in rows:
            backbone = copy.deepcopy(module.backbone).to(module.device).eval()
            backbones[row["routing_spec"]] = prune(backbone, load_routing(row["routing_spec"]))
        seconds = time_interleaved(backbones, images.to(module.device), warmup=1, repeats=config.throughput_repeats)
        for row in rows:
            row["images_per_s"] = len(images) / seconds[row["routing_spec"]]
    return rows


def report(rows: list[dict[str, Any]], output_dir: Path, logger: Any) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{'routing':32}{'GFLOPs':>9}{'top-1':>8}{'top-5':>8}{'images/s':>10}")
    for row in rows:
        print(
            f"{row['routing']:32}{row['gflops']:>9.3f}{fmt(row['top1'], '>8.2%')}{fmt(row['top5'], '>8.2%')}"
            f"{fmt(row['images_per_s'], '>10.1f')}"
        )
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'results.csv'}")
    if isinstance(logger, WandbLogger):
        logger.log_table("evaluate/results", columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    cli = EvaluateCLI(run=False, args=args, trainer_defaults=trainer_defaults())
    rows = evaluate(cli)
    if cli.trainer.is_global_zero:
        report(rows, Path(cli.config.output_dir), cli.trainer.logger)
    return rows


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
