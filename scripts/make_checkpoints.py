"""Train the shipped offline models on Fashion-MNIST and export them to checkpoints/ with their model cards.

One model per training paradigm, all with the same backbone shape (configs/fashion_mnist/). Each is trained with
train.py on the training split (validation held out), the best epoch on validation is exported as safetensors with
the metadata attnprune.load_model needs, and its model card records the commands, seed, wall time, split and test
top-1. Not part of CI: run it on a quiet machine, one training at a time.

Two recipes, each a list of stages per model (every stage names its accelerator): ``cpu`` (the default; stages
sized to train in under an hour on 2 CPU cores, except the supervised model's third stage, a GPU stage) and ``gpu``
(longer schedules and more loader workers, from overlay configs in configs/fashion_mnist/gpu/; the distilled model's
warm restart and the DINO probe are CPU stages). A stage is a train.py run of configs from configs/fashion_mnist/ and
command-line options over them: a warm restart starts from the last epoch of the stage before. The shipped supervised
model followed ``cpu``, the other three ``gpu``; each card lists the commands that made it. Arguments not known to
this script are passed to every train.py stage (e.g. ``--trainer.max_time 00:00:05:00``).

    .venv/bin/python scripts/make_checkpoints.py                      # all four, in dependency order
    .venv/bin/python scripts/make_checkpoints.py supervised           # one
    .venv/bin/python scripts/make_checkpoints.py supervised --export_only   # re-export after an interrupted run
    python scripts/make_checkpoints.py supervised distilled --recipe gpu  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from attnprune import count_flops, save_model
from attnprune.atomic import write_text_atomic
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.lit.modules import DistillationClassifier, LinearProbe, PrunedClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"
RUNS = ROOT / "runs"

# name -> (paradigm, module class of the final stage)
MODELS = {
    "supervised": ("supervised", PrunedClassifier),
    "distilled": ("distilled", DistillationClassifier),
    "dino": ("dino", LinearProbe),
    "mae": ("mae", PrunedClassifier),
}


class Stage(NamedTuple):
    """One train.py run: configs from configs/fashion_mnist/ (a later one overrides an earlier one), then
    command-line options over them (``{"model.init_args.lr": "0.001"}`` is ``--model.init_args.lr 0.001``)."""

    configs: tuple[str, ...]
    options: dict[str, str] | None = None


def restart_from(name: str, stage: int, **fields: str) -> str:
    """A backbone (``--model.init_args.backbone``) that starts from the last epoch of model ``name``'s ``stage``, in
    the architecture it names; ``fields`` set other backbone fields (``model_kwargs="null"``)."""
    fields = {"model": "auto", "checkpoint": f"runs/fmnist-{name}/stage{stage}/last.ckpt", **fields}
    return "{" + ", ".join(f"{key}: {value}" for key, value in fields.items()) + "}"


def supervised_restart(stage: int, options: dict[str, str] | None = None) -> Stage:
    """A later stage of the supervised model: a warm restart (SGDR: a new warm-up and cosine decay, at half the first
    stage's peak learning rate) from the last epoch of the stage before, whose validation top-1 was still rising.
    Shape and preprocessing come from that checkpoint; ``options`` override these."""
    base = {
        "trainer.max_epochs": "10",
        "trainer.logger.init_args.name": "fmnist-supervised-continue",
        "model.init_args.backbone": restart_from("supervised", stage - 1, model_kwargs="null", pretrained_cfg="null"),
        "model.init_args.lr": "0.001",
    }
    return Stage(("supervised.yaml",), {**base, **(options or {})})


# recipe -> name -> training stages
RECIPES = {
    "cpu": {
        "supervised": [
            Stage(("supervised.yaml",)),
            supervised_restart(1),
            # a GPU stage: 2 CPU cores would take 70 min
            supervised_restart(
                2,
                {
                    "trainer.max_epochs": "20",
                    "trainer": "{accelerator: gpu, devices: 1}",
                    "data.init_args.num_workers": "14",  # the data transforms spread over the GPU machine's cores
                },
            ),
            supervised_restart(3, {"model.init_args.lr": "0.0005"}),
        ],
        "distilled": [Stage(("distilled.yaml",))],
        "dino": [Stage(("dino_pretrain.yaml",)), Stage(("dino_probe.yaml",))],
        "mae": [Stage(("mae_pretrain.yaml",)), Stage(("mae_finetune.yaml",))],
    },
    "gpu": {
        "supervised": [Stage(("supervised.yaml", "gpu/supervised.yaml"))],
        "distilled": [
            Stage(("distilled.yaml", "gpu/distilled.yaml")),
            # on the CPU: a warm restart from the GPU stage, which its time limit stopped before the learning rate had
            # decayed; the teacher is distilled.yaml's, the shipped supervised model
            Stage(
                ("distilled.yaml",),
                {
                    "trainer.max_epochs": "8",
                    "trainer.logger.init_args.name": "fmnist-distilled-continue",
                    "model.init_args.backbone": restart_from("distilled", 0),
                    "model.init_args.lr": "0.001",
                },
            ),
        ],
        "dino": [
            Stage(("dino_pretrain.yaml", "gpu/dino_pretrain.yaml")),
            Stage(("dino_probe.yaml",)),  # on the CPU: only the linear head trains (12 min on 2 cores)
        ],
        "mae": [
            Stage(("mae_pretrain.yaml", "gpu/mae_pretrain.yaml")),
            Stage(("mae_finetune.yaml", "gpu/mae_finetune.yaml")),
        ],
    },
}


def stage_command(name: str, index: int, stage: Stage, extra: list[str]) -> list[str]:
    """The train.py command of one stage; its checkpoints go to runs/fmnist-<name>/stage<index>."""
    command = ["python", "train.py", "fit"]
    for config in stage.configs:
        command += ["--config", str((CONFIGS / config).relative_to(ROOT))]
    for option, value in (stage.options or {}).items():
        command += [f"--{option}", value]
    return [*command, "--checkpoint.dirpath", f"runs/fmnist-{name}/stage{index}", *extra]


def this_machine() -> str:
    """This machine's GPU and CPU cores, for the card."""
    cores = f"{os.cpu_count()} CPU cores"
    return f"one {torch.cuda.get_device_name(0)} GPU, {cores}" if torch.cuda.is_available() else cores


def best_checkpoint(dirpath: Path) -> Path:
    """The checkpoint ModelCheckpoint ranked best (validation top-1), else last.ckpt."""
    last = dirpath / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    for key, value in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            return dirpath / Path(value["best_model_path"]).name  # the run may have been moved since
    return last


@torch.no_grad()
def test_top1(model: torch.nn.Module, images: int | None = None) -> float:
    """Top-1 on the Fashion-MNIST test split (the first ``images`` images, or all)."""
    from timm.data import resolve_model_data_config

    data = FashionMNISTDataModule(batch_size=256, data_config=resolve_model_data_config(model))
    data.setup("test")
    correct = total = 0
    for x, y in data.test_dataloader():
        if images is not None:
            x, y = x[: images - total], y[: images - total]
        correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
        if images is not None and total >= images:
            break
    return correct / total


def export(
    name: str, recipe: str, commands: list[list[str]], seconds: float | None, hardware: str, note: str = ""
) -> dict:
    paradigm, module_class = MODELS[name]
    ckpt = best_checkpoint(RUNS / f"fmnist-{name}" / f"stage{len(commands) - 1}")
    module = module_class.load_from_checkpoint(ckpt, map_location="cpu").eval()
    model = module.model
    if isinstance(module, LinearProbe):
        if module.n_last_blocks != 1:
            raise ValueError("only a probe on the last class token folds into a timm head (n_last_blocks=1)")
        model.reset_classifier(module.head.out_features)
        model.head.load_state_dict(module.head.state_dict())
    spec = module.hparams["model_spec"]
    kwargs = {**spec["model_kwargs"], "num_classes": model.num_classes}
    top1 = test_top1(model)
    top1_1k = test_top1(model, 1000)
    card = {
        "name": f"fmnist_{name}",
        "paradigm": paradigm,
        "architecture": spec["architecture"],
        "model_kwargs": kwargs,
        "commands": [shlex.join(c) for c in commands],
        "export_command": f"python scripts/make_checkpoints.py {name} --recipe {recipe}",
        "seed": 0,
        "train_wall_time_s": seconds,
        "hardware": hardware,
        "data": "Fashion-MNIST: trained on 55,000 training images; 5,000 training images held out for validation "
        "(FashionMNISTDataModule, seed 0); tested on the 10,000 test images",
        "source_checkpoint": str(ckpt.relative_to(ROOT)),
        "test_top1": top1,
        "test_top1_first_1000": top1_1k,
        "gflops": count_flops(model) / 1e9,
        "params": sum(p.numel() for p in model.parameters()),
        "note": note,
    }
    out = ROOT / "checkpoints" / f"fmnist_{name}.safetensors"
    # The paradigm is the script's, not the checkpoint's: the first distilled run was started when train.py's default
    # for DistillationClassifier was still "supervised" (same network, only the recorded label differed).
    save_model(model, out, spec["architecture"], paradigm, kwargs, card=card)
    write_text_atomic(out.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    write_card(out.with_suffix(".md"), card)
    print(f"{name}: test top-1 {top1:.2%} (first 1,000: {top1_1k:.2%}), wrote {out}")
    return card


def write_card(path: Path, card: dict) -> None:
    hardware = card.get("hardware", "2 CPU cores")
    wall = f"{card['train_wall_time_s'] / 60:.0f} min on {hardware}" if card["train_wall_time_s"] else "see the log"
    lines = [
        f"# {card['name']}",
        "",
        f"A {card['paradigm']} ViT trained on Fashion-MNIST by attnprune, shipped as an offline model.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| architecture | `{card['architecture']}` with `{json.dumps(card['model_kwargs'])}` |",
        f"| paradigm | {card['paradigm']} |",
        f"| test top-1 (10,000 images) | {card['test_top1']:.2%} |",
        f"| test top-1 (first 1,000) | {card['test_top1_first_1000']:.2%} |",
        f"| GFLOPs per image | {card['gflops']:.4f} |",
        f"| parameters | {card['params']:,} |",
        f"| seed | {card['seed']} |",
        f"| training wall time | {wall} |",
        f"| data | {card['data']} |",
        "",
        "Trained with (from the repository root):",
        "",
        "```bash",
        *card["commands"],
        card["export_command"] + " --export_only   # export the best validation epoch, measure test top-1",
        "```",
        "",
        f"Load it with `attnprune.load_model('checkpoints/{card['name']}.safetensors')`.",
        "",
        *([f"Note: {card['note']}", ""] if card.get("note") else []),
    ]
    write_text_atomic(path, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipe", default="cpu", choices=list(RECIPES))
    parser.add_argument("--export_only", action="store_true", help="export existing runs without training")
    parser.add_argument("--wall_time_s", type=float, help="with --export_only: the measured training time to record")
    parser.add_argument("--hardware", help="what trained the model (default: this machine)")
    parser.add_argument("--note", default="", help="a remark for the model card")
    args, extra = parser.parse_known_args()
    for name in args.names:
        stages = RECIPES[args.recipe][name]
        commands = [stage_command(name, i, stage, extra) for i, stage in enumerate(stages)]
        seconds = args.wall_time_s
        if not args.export_only:
            start = time.perf_counter()
            for command in commands:
                print("$", " ".join(command), flush=True)
                subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True)
            seconds = time.perf_counter() - start
        export(name, args.recipe, commands, seconds, args.hardware or this_machine(), args.note)


if __name__ == "__main__":
    main()
