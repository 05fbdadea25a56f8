"""Search the best static routing under a FLOPs budget on validation data (never the test split).

By default candidates are ranked by fidelity to the unpruned model (KL divergence of the class distributions, no
labels needed), and 30% of the images are held out to check the routing found against ToMe, EViT, attention
top-k, PiToMe and PPT within the same budget: a baseline that does better there is returned, and the report says so.

Writes the routing YAML to ``--output`` and the report (objective, validation KL and top-1, FLOPs, candidates
evaluated, block passes, wall time, held-out check, and under ``searched_on`` which source images were searched on)
next to it as JSON; evaluate.py refuses to report that routing on any of those images. On a source with only
ImageNet's validation images, ``--data.init_args.search_split`` carves the search split out of them. With
``--state_path``, rerunning the same command continues an interrupted search.

    python search.py --model checkpoints/fmnist_supervised.safetensors \\
        --data.class_path attnprune.lit.data.FashionMNISTDataModule --budget 0.6 \\
        --state_path runs/search/supervised-0.6.json --output results/routing-0.6.yaml
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from jsonargparse import CLI

from attnprune import load_model
from attnprune.atomic import check_distinct_outputs, check_output_file, write_text_atomic
from attnprune.cli import run_cli
from attnprune.errors import AllRanksError, UserError, check_finite_outputs
from attnprune.lit.data import ImageDataModule
from attnprune.search import SearchResult, search_routing
from attnprune.search.distributed import world
from attnprune.search.strategy import RateOptions

# A rank that hangs alive makes the others fail after this long instead of waiting forever (a rank that dies closes
# its connections, which fails the others at once); healthy ranks never wait on each other nearly as long, as they
# hold equal shares.
RANK_TIMEOUT = timedelta(minutes=10)


@contextmanager
def ranks(device: str) -> Iterator[torch.device]:
    """This rank's device, in the process group that torchrun's environment asks for (``WORLD_SIZE`` > 1): gloo on
    the CPU, nccl on CUDA with the GPU ``LOCAL_RANK``; a group this started is torn down at the end.

    Raises:
        UserError: a device other than ``cpu`` or ``cuda``, or ``cuda`` without a GPU for this rank.
        AllRanksError: a user error of the search, which every rank raises alike (the command line prints rank 0's).
    """
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    target = torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu")
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if target.index >= torch.cuda.device_count():
            raise UserError(f"--device cuda: rank {target.index} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(target)
    start = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if start:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=RANK_TIMEOUT)
    try:
        yield target
    except UserError as error:  # every rank raises it alike (see attnprune.search.distributed): rank 0 says it
        rank, size = world()
        if size == 1 or isinstance(error, AllRanksError):
            raise
        raise AllRanksError(str(error), rank) from error
    finally:
        if start:
            dist.destroy_process_group()


def check_outputs(output: str, state_path: str | None) -> None:
    """Before any work: the routing YAML (``--output``), the report beside it and the state can each be written,
    and no two are the same file (``--output r.json`` would be overwritten by its own report).

    Raises:
        UserError: naming the option and the path.
    """
    report = Path(output).with_suffix(".json")
    outputs = {"--output": output, "--output's report (its name with .json)": report, "--state_path": state_path}
    check_distinct_outputs(outputs)
    check_output_file(output, "--output")
    check_output_file(report, "--output's report")
    if state_path is not None:
        check_output_file(state_path, "--state_path")


def search(
    model: str,
    data: ImageDataModule,
    budget: float,
    *,
    strategy: str = "beam",
    val_images: int | None = None,
    state_path: str | None = None,
    output: str = "routing.yaml",
    beam_width: int = 2,
    objective: str = "fidelity",
    holdout: float = 0.3,
    confidence: float = 0.5,
    rates: RateOptions | None = None,
    architecture: str | None = None,
    device: str = "cpu",
) -> SearchResult:
    """Run the search (data-parallel under torchrun).

    Args:
        model: timm hub name, weights file or Lightning checkpoint (``attnprune.load_model``).
        data: the data module; the first ``val_images`` of its validation split are searched on (with
            ``search_split``, a seeded part of the source's held-out split; see :class:`ImageDataModule`).
        budget: FLOPs budget as a fraction of the unpruned model.
        strategy: ``beam``, ``transition``, ``label_free`` or ``diffrate`` (DiffRate's differentiable rate search).
        val_images: validation images searched on (default: as many as the split holds, at most 5,000); more than
            it holds is an error.
        state_path: resumable search state.
        output: routing YAML written (the report goes to the same name with ``.json``).
        beam_width: partial routings kept per layer.
        objective: ``fidelity`` (KL divergence from the unpruned model, or cosine distance for a headless one),
            ``kl``, ``cosine`` (of the pooled features, also on a model with a head) or ``top1``.
        holdout: fraction of the validation images kept out of the search to check the routing found against the
            baselines within budget; 0 checks nothing.
        confidence: the routing found is kept only if it beats every baseline on the held-out images with this
            confidence (one-sided paired test); otherwise the best baseline there is returned. At the default 0.5
            the lowest mean held-out loss decides.
        rates: settings of ``--strategy diffrate`` (``--rates.steps 300 --rates.batch_size 128 ...``, see
            :class:`~attnprune.search.strategy.RateOptions`).
        architecture: the timm architecture of a weights file that does not name its own (a plain timm ``.pth``).
        device: ``cpu`` or ``cuda`` (one process: the first GPU; under torchrun, the GPU ``LOCAL_RANK`` of each rank,
            nccl between them; ``--strategy diffrate`` runs on the CPU only).
    """
    with ranks(device) as target:
        if val_images is not None and val_images < 1:
            raise UserError(f"--val_images must be at least 1, got {val_images}")
        check_outputs(output, state_path)
        first = world()[0] == 0
        network = load_model(model, architecture).to(target)
        batches = data.for_model(network).take("validation", val_images, "--val_images", default=5000)
        read = sum(len(labels) for _, labels in batches)
        if first:
            print(f"searching on the first {read:,} images of {data.describe_split('validation')}")
        if batches:  # before the search: NaN logits would make every candidate tie, not fail
            check_finite_outputs(network(batches[0][0].to(target)), f"--model {model}")
        result = search_routing(
            network,
            batches,
            budget,
            strategy=strategy,
            objective=objective,
            state_path=state_path,
            beam_width=beam_width,
            holdout=holdout,
            confidence=confidence,
            rates=rates,
        )
    if first:
        searched_on = data.split_record("validation", read)
        report = {**result.report, "model": model, "routing": result.routing.to_dict(), "searched_on": searched_on}
        write_text_atomic(Path(output).with_suffix(".json"), json.dumps(report, indent=2))
        write_text_atomic(output, result.routing.to_yaml())
        print(result.routing.to_yaml())
        print(json.dumps(result.report, indent=2))
        if "note" in result.report.get("check", {}):
            print(result.report["check"]["note"])
    return result


def main(args: list[str] | None = None):
    """The command line: one line on stderr and exit status 2 for bad input (see :mod:`attnprune.cli`)."""
    torch.set_grad_enabled(False)
    return CLI(search, as_positional=False, args=args, exit_on_error=False)


def run() -> None:
    """The ``attnprune-search`` console script: :func:`main` on ``sys.argv``, one line and exit status 2 on a user
    error."""
    run_cli(main)
