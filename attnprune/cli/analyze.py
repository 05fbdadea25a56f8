"""Measure attention selectivity layer by layer on validation images; write tables, plots and token maps.

Writes to ``--output_dir``: ``selectivity.json`` and ``selectivity.csv`` (every metric at every layer),
``selectivity.png`` (concentration and stability against depth), ``reliability.png`` (each scorer's agreement with
the leave-one-out oracle, one line per scorer) and, for every ``--routings`` entry, ``tokens_<name>.png`` (which
patches survive, or into which token they were merged, after each pruning layer; the routing's name with every
character that could lead outside ``--output_dir`` replaced, and made unique).

    python analyze.py --model checkpoints/fmnist_supervised.safetensors \\
        --data.class_path attnprune.lit.data.FashionMNISTDataModule --num_images 512 \\
        --routings '[configs/routing/layerwise_example.yaml]' --output_dir results/selectivity/supervised
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from jsonargparse import CLI
from timm.data import resolve_model_data_config
from tqdm.auto import tqdm

from attnprune import Routing, count_flops, load_model
from attnprune.atomic import check_output_dir, safe_file_names, staged_dir
from attnprune.cli import run_cli
from attnprune.errors import UserError, check_finite_outputs
from attnprune.lit.data import ImageDataModule
from attnprune.lit.data.checks import check_count, resolve_count, split_size
from attnprune.report import plot_reliability, plot_selectivity, plot_token_maps, write_tables
from attnprune.selectivity import SelectivityAnalyzer
from attnprune.selectivity.transition import attention_transition_depth, informative_layers


def analyze(
    model: str,
    data: ImageDataModule,
    *,
    output_dir: str = "results/selectivity",
    num_images: int | None = None,
    oracle: bool = True,
    keep: float = 0.5,
    routings: list[str] | None = None,
    token_map_images: int | None = None,
    architecture: str | None = None,
) -> dict:
    """Run the analysis (see the module docstring).

    Args:
        model: a timm hub name, local weights file or Lightning checkpoint (see ``attnprune.load_model``).
        data: the data module; its ``validation`` split is analysed (never the test split; on val-only ImageNet,
            ``search_split`` carves it out of the held-out split).
        output_dir: where the tables and plots go.
        num_images: validation images analysed (default: as many as the split holds, at most 512); more than it
            holds is an error.
        oracle: measure scorer reliability against the leave-one-out oracle (the costly part).
        keep: fraction of tokens of the top-k overlap.
        routings: routings whose token maps are drawn: presets such as ``tome:r=4`` or routing YAML files.
        token_map_images: images per token map, of the first batch (default: 4, or fewer if it holds fewer).
        architecture: the timm architecture of a weights file that does not name its own (a plain timm ``.pth``).
    """
    if num_images is not None and num_images < 1:
        raise UserError(f"--num_images must be at least 1, got {num_images}")
    if not (0 < keep <= 1):
        raise UserError(f"--keep must be a fraction in (0, 1] (of the tokens in the top-k overlap), got {keep}")
    if token_map_images is not None and token_map_images < 1:
        raise UserError(f"--token_map_images must be at least 1, got {token_map_images}")
    check_output_dir(output_dir, "--output_dir")
    network = load_model(model, architecture)
    checked = {}
    for spec in routings or []:  # every routing is loaded and fitted to the model before any image is analysed
        try:
            checked[spec] = Routing.parse(spec, len(network.blocks))
            count_flops(network, checked[spec])
        except (ValueError, FileNotFoundError, TypeError) as err:
            raise type(err)(f"--routings entry {spec!r}: {err}") from err
    data.for_model(network).setup("validate")
    where, asked = data.describe_split("validation"), num_images
    num_images = resolve_count("--num_images", num_images, 512, split_size(data.splits["validation"]), where)
    batch = data.hparams.eval_batch_size or data.hparams.batch_size  # the token maps are of the first batch's images
    first_batch = f"the first batch (of {batch} images)"
    token_map_images = resolve_count("--token_map_images", token_map_images, 4, min(num_images, batch), first_batch)
    print(f"analysing the first {num_images:,} images of {data.describe_split('validation')}")
    analyzer = SelectivityAnalyzer(len(network.blocks), network.has_class_token, oracle=oracle, keep=keep)
    start = time.perf_counter()
    seen, first = _analyse(analyzer, network, data, num_images, model)
    if asked is not None:  # a stream holds what it holds
        check_count("--num_images", num_images, seen, where)
    seconds = time.perf_counter() - start
    results = analyzer.compute()
    depth = attention_transition_depth(results, informative=informative_layers(network)) if oracle else None
    meta = {
        "model": model,
        "images": seen,
        "seconds": seconds,
        "oracle_sequences": analyzer.oracle_sequences,
        "attention_transition_depth": depth,
    }
    _write(Path(output_dir), results, meta, network, first[:token_map_images], list(checked.values()), oracle)
    where = f"takes over at block {depth}" if depth is not None else "never takes over"
    print(
        f"analysed {seen} images in {seconds:.1f} s ({analyzer.oracle_sequences} oracle sequences); attention {where} "
        "(it agrees with the oracle better than every non-attention scorer from there on)"
    )
    print(f"wrote {output_dir}/selectivity.json, selectivity.csv and the plots")
    return meta


def _analyse(
    analyzer: SelectivityAnalyzer, network: torch.nn.Module, data: ImageDataModule, num_images: int, model: str
) -> tuple[int, torch.Tensor]:
    """Feed the first ``num_images`` validation images to ``analyzer``; returns how many and the first batch."""
    seen, first = 0, None
    batches = iter(data.val_dataloader())
    head = next(batches, None)
    if head is not None:  # before any analysis: NaN logits would give tables of nulls, not an error
        check_finite_outputs(network(head[0][:num_images]), f"--model {model}")
    with tqdm(total=num_images, desc="selectivity") as bar:
        for images, _ in itertools.chain([head] if head is not None else [], batches):
            images = images[: num_images - seen]
            first = images if first is None else first
            analyzer.update(network, images)
            seen += len(images)
            bar.update(len(images))
            if seen >= num_images:
                break
    if seen == 0:
        raise UserError("the data module's validation split gave no images; expected at least one (--data)")
    return seen, first


def _write(
    out: Path,
    results: dict,
    meta: dict,
    network: torch.nn.Module,
    images: torch.Tensor,
    routings: list[Routing],
    oracle: bool,
) -> None:
    """The tables, the plots (the scorers' reliability with ``oracle``) and a token map per routing, in ``out`` only
    once every file is written."""
    name = Path(meta["model"]).stem
    with staged_dir(out) as stage:
        write_tables(results, stage, meta)
        plot_selectivity(results, stage / "selectivity.png", title=name)
        if oracle:
            plot_reliability(results, stage / "reliability.png", title=f"{name}: scorer reliability")
        cfg = resolve_model_data_config(network)
        for routing, file_name in zip(routings, safe_file_names(r.name for r in routings), strict=True):
            plot_token_maps(network, images, routing, stage / f"tokens_{file_name}.png", cfg["mean"], cfg["std"])


def main(args: list[str] | None = None):
    """The command line: one line on stderr and exit status 2 for bad input (see :mod:`attnprune.cli`)."""
    torch.set_grad_enabled(False)
    return CLI(analyze, as_positional=False, args=args, exit_on_error=False)


def run() -> None:
    """The ``attnprune-analyze`` console script: :func:`main` on ``sys.argv``, one line and exit status 2 on a user
    error."""
    run_cli(main)
