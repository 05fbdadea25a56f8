"""Evaluate a model under one or more routings, with timm's conventions (``validate.py``): one row per routing with
the model, checkpoint, parameter count, preprocessing, image count, batch size, precision and device, GFLOPs,
top-1/top-5 and their errors, and images/s. Accuracy is a fraction in every file and metric key; the printed table
alone shows percent, and says so.

A LightningCLI entry point configured by YAML under configs/ (model, data, trainer). The model's ``checkpoint`` is
a timm hub name, a local weights file or a Lightning checkpoint; ``--ckpt_path`` restores a whole module saved by
train.py (a linear probe with its head, say). A routing is ``unpruned``, a preset by name (``tome:r=13``,
``evit:keep=0.7``, ``topk_attention:keep=0.7``, ``random:keep=0.7``; see :meth:`attnprune.Routing.parse`)
or a routing YAML file. Every routing is checked against the model before any pass runs, and a routing whose search
(search.py's report beside its YAML) read any of the test images is refused. Prints the table and writes
``results.json`` and ``results.csv`` (and a plot of top-1 against GFLOPs) to ``--output_dir``; every logger gets each
routing's metrics under ``test/<routing>/...`` (``top1``, ``top5``, ``loss``, ``gflops``, ``images_per_s``; W&B also
one table and the plot).

    python evaluate.py --config configs/fashion_mnist/evaluate.yaml \
        --routings '[unpruned, "tome:r=2", "evit:keep=0.7", configs/routing/layerwise_example.yaml]'
"""

from __future__ import annotations

import copy
import csv
import json
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import nn

from attnprune.atomic import check_output_dir, staged_dir
from attnprune.cli import lightning_parser_kwargs, run_cli
from attnprune.errors import UserError, check_finite
from attnprune.flops import count_flops
from attnprune.io import WEIGHT_SUFFIXES
from attnprune.lit.cli import AttnpruneCLI, discard_failed_run, existing_folders, prepare_wandb, trainer_defaults
from attnprune.report import plot_accuracy_vs_flops
from attnprune.routing import Routing
from attnprune.timing import device_name, time_interleaved
from attnprune.vit import prune

COLUMNS = (
    "model",
    "checkpoint",
    "routing",
    "param_count",
    "img_size",
    "crop_pct",
    "interpolation",
    "images",
    "batch_size",
    "precision",
    "device",
    "gflops",
    "top1",
    "top5",
    "top1_err",
    "top5_err",
    "images_per_s",
)


class EvaluateCLI(AttnpruneCLI):
    def add_arguments_to_parser(self, parser) -> None:  # no checkpointing or LR monitor: nothing is trained
        parser.add_argument(
            "--routings",
            type=list[str],
            default=["unpruned"],
            help="routings: 'unpruned', presets by name (tome:r=13, evit:keep=0.7, topk_attention:keep=0.7, "
            "random:keep=0.7) or routing YAML files",
        )
        parser.add_argument("--output_dir", type=str, default="results/evaluate")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="a Lightning checkpoint of the whole module (weights of model and head)",
        )
        parser.add_argument("--throughput_repeats", type=int, default=10, help="timed rounds for images/s (0: skip)")
        parser.add_argument("--throughput_warmup", type=int, default=2, help="untimed rounds before timing")
        parser.add_argument("--throughput_batches", type=int, default=4, help="test batches timed in every round")


def check_routings(specs: list[str], backbone: nn.Module) -> dict[str, Routing]:
    """Every routing parsed and resolved against the model (depth, token counts) before any pass runs; routing
    names are made unique. Errors name the routing."""
    routings: dict[str, Routing] = {}
    for spec in specs:
        try:
            routing = Routing.parse(spec, len(backbone.blocks))
            count_flops(backbone, routing)  # resolves every rule against the model's depth and tokens
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"routing {spec!r} does not fit the model: {err}") from err
        name, n = routing.name, 2
        while name in routings:
            name, n = f"{routing.name}-{n}", n + 1
        routings[name] = routing
    return routings


def check_unseen(specs: list[str], datamodule: Any) -> None:
    """Refuse a routing whose search read any image of the test split: the search's report (the routing YAML's
    ``.json`` that search.py writes beside it) records the source images it searched on. A report of another source
    cannot be compared: that is a warning on stderr, with the count of images the search read.

    Raises:
        UserError: naming the routing, how many test images its search saw and the split settings to use.
    """
    for spec in specs:
        report = Path(spec).with_suffix(".json")
        if Path(spec).suffix not in (".yaml", ".yml") or not report.is_file():
            continue
        record = json.loads(report.read_text()).get("searched_on")
        if not isinstance(record, dict) or not hasattr(datamodule, "searched_overlap"):
            continue
        seen, total = datamodule.searched_overlap(record), len(datamodule.origins["test"][1])
        searched = f"{len(record.get('positions', [])):,} images of {record.get('source')}"
        if seen is None:
            print(
                f"WARNING: routing {spec} was searched on {searched} ({report}), another source than "
                f"{datamodule.describe_source()}: none of its images can be checked against the test split",
                file=sys.stderr,
            )
        elif seen:
            settings = ", ".join(f"{k}={record.get(k)}" for k in ("search_split", "seed", "val_size"))
            raise UserError(
                f"routing {spec} was searched on {seen:,} of the {total:,} test images ({report}); evaluate.py reports "
                f"only on images the search did not see: give the data module the search's split ({settings})"
            )


class ImageCounter(Callback):
    """Counts the test images of one ``trainer.test`` over all processes."""

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.count = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.count += len(batch[1])

    def total(self, trainer: L.Trainer) -> int:
        return int(trainer.strategy.reduce(torch.tensor(float(self.count)), reduce_op="sum").item())


class _OverBatches(nn.Module):
    """One forward over several batches: a timed unit of :func:`time_interleaved`."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        super().__init__()
        self.model, self.batches = model, batches

    def forward(self, _: torch.Tensor) -> None:
        for batch in self.batches:
            self.model(batch)


def throughput(
    module: L.LightningModule,
    routings: dict[str, Routing],
    batches: list[torch.Tensor],
    trainer: L.Trainer,
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    """Images/s of each routing on ``batches``, on the module's device and under the trainer's precision: ``warmup``
    untimed rounds, then the median of ``repeats`` rounds, interleaved (every round times each routing once, from a
    different first one), so load on a busy machine falls on all routings alike."""
    device, precision = module.device, trainer.strategy.precision_plugin
    batches = [precision.convert_input(batch.to(device)) for batch in batches]  # bf16-true / 16-true inputs too
    models = {}
    for name, routing in routings.items():
        backbone = prune(copy.deepcopy(module.backbone).to(device).eval(), routing)
        models[name] = _OverBatches(backbone, batches)
    with precision.forward_context():
        seconds = time_interleaved(models, batches[0], warmup=warmup, repeats=repeats, progress=False)
    images = sum(len(batch) for batch in batches)
    return {name: images / seconds[name] for name in routings}


def load_module_checkpoint(cls: type[L.LightningModule], path: str) -> L.LightningModule:
    """The module of class ``cls`` that the Lightning checkpoint ``path`` (given as ``--ckpt_path``) holds.

    Raises:
        UserError: (or FileNotFoundError, IsADirectoryError) naming the path: missing, a folder, not a PyTorch zip
            archive (text, safetensors weights, a truncated file), or a checkpoint that is not of ``cls``.
    """
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"--ckpt_path {path} is a directory; expected a Lightning checkpoint file")
    if not file.is_file():
        raise FileNotFoundError(f"--ckpt_path {path} does not exist; expected a Lightning checkpoint file")
    if not zipfile.is_zipfile(file):  # what torch.save writes: text, safetensors and cut files fail here, by name
        weights = (
            f"; a weights file is the model's checkpoint: --model.init_args.backbone.checkpoint {path}"
            if file.suffix in WEIGHT_SUFFIXES
            else ""
        )
        raise UserError(
            f"--ckpt_path {path} is not a Lightning checkpoint (not a PyTorch zip archive: text, weights or a "
            f"truncated file){weights}"
        )
    try:
        return cls.load_from_checkpoint(path, map_location="cpu")
    except (KeyError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise UserError(
            f"--ckpt_path {path} is not a Lightning checkpoint of a {cls.__name__} ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'})"
        ) from err


def evaluate(cli: EvaluateCLI) -> list[dict[str, Any]]:
    config = cli.config
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if config.throughput_repeats < 0 or config.throughput_warmup < 0:
        raise UserError(
            f"--throughput_repeats and --throughput_warmup must be >= 0, got {config.throughput_repeats} and "
            f"{config.throughput_warmup}"
        )
    if config.throughput_repeats > 0 and config.throughput_batches < 1:
        raise UserError(f"--throughput_batches must be at least 1, got {config.throughput_batches}")
    if not config.routings:
        raise UserError(
            "--routings is empty; give at least one routing: unpruned, a preset (tome:r=13) or a routing YAML file"
        )
    check_output_dir(config.output_dir, "--output_dir")
    if config.ckpt_path:
        module = load_module_checkpoint(type(module), config.ckpt_path)
    check_finite(module.state_dict(), config.ckpt_path or f"--model checkpoint {module.backbone_config.checkpoint}")
    routings = check_routings(config.routings, module.backbone)
    if hasattr(datamodule, "prepare_splits"):
        if not datamodule.splits:
            datamodule.prepare_splits()  # a data source it cannot read fails here, before any pass or W&B run
        datamodule.check_split("test")
        datamodule.check_classes(module.num_classes)
        check_unseen(config.routings, datamodule)
        if trainer.is_global_zero:
            print(f"evaluating on {datamodule.describe_split('test')}")
    counter = ImageCounter()
    trainer.callbacks.append(counter)
    spec = module.hparams.get("model_spec") or {}
    checkpoint = config.ckpt_path or module.backbone_config.checkpoint
    rows = []
    for (name, routing), routing_spec in zip(routings.items(), config.routings, strict=True):
        module.set_routing(routing)
        module.test_key = f"test/{name}"  # each routing's metrics under its own keys in every logger
        metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        data_config = datamodule.resolved_data_config()
        top1 = metrics[f"test/{name}/top1"]  # fractions, as every metric key holds them
        top5 = metrics.get(f"test/{name}/top5")
        rows.append(
            {
                "model": spec.get("architecture", type(module.backbone).__name__),
                "checkpoint": checkpoint,
                "routing": name,
                "routing_spec": routing_spec,
                "param_count": round(sum(p.numel() for p in module.backbone.parameters()) / 1e6, 4),
                "img_size": int(data_config["input_size"][-1]),
                "crop_pct": data_config.get("crop_pct"),
                "interpolation": data_config.get("interpolation"),
                "images": counter.total(trainer),
                "batch_size": datamodule.hparams.get("eval_batch_size") or datamodule.hparams.batch_size,
                "precision": str(trainer.precision),
                "device": device_name(module.device),
                "gflops": module.gflops(),
                "top1": top1,
                "top5": top5,
                "top1_err": 1.0 - top1,
                "top5_err": None if top5 is None else 1.0 - top5,
                "images_per_s": None,
            }
        )
    if config.throughput_repeats > 0 and trainer.is_global_zero:
        batches = []
        for images, _ in datamodule.test_dataloader():
            batches.append(images)
            if len(batches) == config.throughput_batches:
                break
        speed = throughput(module, routings, batches, trainer, config.throughput_warmup, config.throughput_repeats)
        for row in rows:
            row["images_per_s"] = speed[row["routing"]]
            row["throughput_images"] = sum(len(batch) for batch in batches)
            row["throughput_rounds"] = config.throughput_repeats
    return rows


def report(rows: list[dict[str, Any]], output_dir: Path, loggers: list[Logger]) -> None:
    """Write the files, print the table and log each routing's images/s to every logger (the module logged its
    accuracy, loss and GFLOPs during the passes), and with W&B the table and the plot."""
    with staged_dir(output_dir) as stage:  # the files appear in output_dir only once every one is written
        (stage / "results.json").write_text(json.dumps(rows, indent=2))
        with open(stage / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        plot = output_dir / plot_accuracy_vs_flops(rows, stage / "top1_vs_gflops.png").relative_to(stage)
    print(f"\n{'routing':32}{'GFLOPs':>9}{'top-1 %':>9}{'top-5 %':>9}{'images/s':>10}")
    for row in rows:
        print(
            f"{row['routing']:32}{row['gflops']:>9.3f}{_cell(row['top1'], 9, 100)}{_cell(row['top5'], 9, 100)}"
            f"{_cell(row['images_per_s'], 10, 1, '.1f')}"
        )
    first = rows[0]
    print(
        f"{first['model']} ({first['param_count']:.2f} M parameters), {first['images']} images at "
        f"{first['img_size']} px (crop_pct {first['crop_pct']}, {first['interpolation']}), "
        f"batch {first['batch_size']}, {first['precision']} on {first['device']}; top-1/top-5 in percent here, "
        "as fractions in the files and every logger"
    )
    print(f"wrote {output_dir / 'results.json'}, {output_dir / 'results.csv'} and {plot}")
    for logger in loggers:
        for row in rows:
            if row["images_per_s"] is not None:
                logger.log_metrics({f"test/{row['routing']}/images_per_s": row["images_per_s"]})
        logger.save()  # a CSV logger writes what it holds only when saved
        if isinstance(logger, WandbLogger):
            log_wandb(rows, logger, plot)


def _cell(value: float | None, width: int, scale: float, spec: str = ".2f") -> str:
    """``value * scale`` right-aligned in ``width`` characters, or a dash where there is no value."""
    return f"{'-':>{width}}" if value is None else f"{value * scale:>{width}{spec}}"


def log_wandb(rows: list[dict[str, Any]], logger: WandbLogger, plot: Path) -> None:
    """One table of every row, a scatter of top-1 against GFLOPs and the plot's image."""
    import wandb

    table = wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])
    scatter = wandb.plot.scatter(table, "gflops", "top1", title="top-1 (fraction) against GFLOPs")
    image = wandb.Image(str(plot))
    logger.experiment.log(
        {"evaluate/results": table, "evaluate/top1_vs_gflops": scatter, "evaluate/top1_vs_gflops_image": image}
    )


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    cli = EvaluateCLI(
        run=False, args=args, trainer_defaults=trainer_defaults(), parser_kwargs=lightning_parser_kwargs(())
    )
    existed = existing_folders(cli.trainer)
    prepare_wandb(cli.trainer)
    try:
        rows = evaluate(cli)
        if cli.trainer.is_global_zero:
            report(rows, Path(cli.config.output_dir), cli.trainer.loggers)
    except BaseException:  # a failed evaluation leaves no logger folders behind
        discard_failed_run(cli.trainer, existed)
        raise
    return rows


def run() -> None:
    """The ``attnprune-evaluate`` console script: :func:`main` on ``sys.argv``, one line and exit status 2 on a user
    error."""
    torch.set_float32_matmul_precision("high")
    run_cli(main)
