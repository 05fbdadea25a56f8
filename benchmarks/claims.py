"""The three claims attnprune rests on, tested on every model given, each with a bootstrap confidence interval.

The claims, their statistics and verdicts are defined in :mod:`attnprune.selectivity.claims` (and the transition
depth of claim (c) in :mod:`attnprune.selectivity.transition`); this script collects the per-image statistics on
Fashion-MNIST validation images, runs the bootstrap, prints the table, writes ``benchmarks/results/claims.json`` and
draws the figure. The per-image statistics are saved (``--stats_dir``) so that the bootstrap, the table and the
figure are rerun without the model; ``--reuse`` skips models whose statistics were saved with the same settings.

    nice -n 19 .venv/bin/python benchmarks/claims.py \\
        --models '[checkpoints/fmnist_supervised.safetensors, checkpoints/fmnist_distilled.safetensors]' \\
        --num_images 2000 --oracle_images 1000 --bootstrap 2000 --seed 0
"""

from __future__ import annotations

import json
import math
import time
from argparse import ArgumentTypeError
from collections.abc import Iterable
from pathlib import Path

import torch
from jsonargparse import CLI
from torch import Tensor

from attnprune import load_model
from attnprune.atomic import (
    atomic_path,
    check_distinct_outputs,
    check_output_dir,
    check_output_file,
    staged_files,
    write_text_atomic,
)
from attnprune.cli import model_source, run_cli
from attnprune.errors import UserError
from attnprune.selectivity.claims import across_models, claims, collect

RESULTS = Path(__file__).resolve().parent / "results"


def validation_images(network, batch_size: int = 50, data_root: str | None = None) -> Iterable[Tensor]:
    """Batches of Fashion-MNIST validation images (the 5,000 held out of training, in a fixed order), preprocessed
    for ``network``."""
    from attnprune.lit.data import FashionMNISTDataModule

    kwargs = {"root": data_root} if data_root else {}
    data = FashionMNISTDataModule(eval_batch_size=batch_size, num_workers=0, **kwargs).for_model(network)
    data.setup("validate")
    return (images for images, _ in data.val_dataloader())


def _bold(verdict: str) -> str:
    return verdict if verdict == "holds" else f"**{verdict}**"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _block(d: int | None) -> str:
    return "never" if d is None else str(d)


def table(rows: list[dict]) -> str:
    """The claims table in Markdown: each claim's statistic, 95% interval and verdict per model (not "holds" in bold),
    then (a) for both queries."""
    lines = [
        "| model | paradigm | blocks | images (oracle) | (a) query | (a) entropy shallow - deep | (a) 95% CI | (a) "
        "| (b) best non-attention vs best attention | (b) difference | (b) 95% CI | (b) "
        "| (c) attention takes over at block | (c) 95% CI | (c) |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | --- | --- | ---: | --- | --- | ---: | --- | --- |",
    ]
    for row in rows:
        a, b, c = row["claims"]["a"], row["claims"]["b"], row["claims"]["c"]
        query = "class token" if a["query"] == "cls" else "all queries"
        lines.append(
            f"| `{row['model']}` | {row['paradigm']} | {row['depth']} "
            f"| {row.get('images')} ({row.get('oracle_images')}) | {query} | {_num(a['statistic'])} "
            f"| [{_num(a['ci'][0])}, {_num(a['ci'][1])}] | {_bold(a['verdict'])} "
            f"| `{b['best_non_attention']}` vs `{b['best_attention']}` | {_num(b['statistic'])} "
            f"| [{_num(b['ci'][0])}, {_num(b['ci'][1])}] | {_bold(b['verdict'])} "
            f"| {_block(c['depth'])} | [{_block(c['ci'][0])}, {_block(c['ci'][1])}] | {_bold(c['verdict'])} |"
        )
    lines += [
        "",
        "| model | readout | class-token query: shallow - deep [95% CI] | all queries: shallow - deep [95% CI] "
        "| attention first leads at block |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for row in rows:
        a, c = row["claims"]["a"], row["claims"]["c"]
        cells = []
        for query in ("cls", "all"):
            q = a["queries"].get(query)
            cells.append(
                "no class token"
                if q is None
                else f"{_num(q['statistic'])} [{_num(q['ci'][0])}, {_num(q['ci'][1])}] {_bold(q['verdict'])}"
            )
        readout = "class token" if a["query"] == "cls" else "average pool"
        lines.append(f"| `{row['model']}` | {readout} | {cells[0]} | {cells[1]} | {_block(c['first_lead'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> list[Path]:
    """Entropy over depth per model (class-token and all queries, 95% bands), transition depth marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False, sharey=True)
    for ax, row in zip(axes.flat, rows, strict=False):
        a, c = row["claims"]["a"], row["claims"]["c"]
        for query, colour in (("cls", "tab:blue"), ("all", "tab:orange")):
            if query not in a["queries"]:
                continue
            q = a["queries"][query]
            blocks = range(len(q["entropy"]))
            label = "class-token query" if query == "cls" else "all queries"
            ax.plot(
                blocks, q["entropy"], marker="o", color=colour, label=label + (" (readout)" * (a["query"] == query))
            )
            ax.fill_between(blocks, q["entropy_ci"][0], q["entropy_ci"][1], color=colour, alpha=0.25, linewidth=0)
        if c["depth"] is not None:
            lo, hi = c["ci"]
            ax.axvline(
                c["depth"], color="k", linestyle="--", linewidth=1.2, label=f"attention takes over: {c['depth']}"
            )
            ax.axvspan(lo - 0.5, (hi if hi is not None else row["depth"] - 1) + 0.5, color="k", alpha=0.07)
        else:
            ax.text(0.02, 0.04, "attention never takes over", transform=ax.transAxes, fontsize=8)
        ax.set(title=f"{row['model']} ({row['paradigm']})", xlabel="block (0-based)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if c["depth"] is None else "best")
    for ax in axes[:, 0]:
        ax.set_ylabel("normalized attention entropy")
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    paths = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    with staged_files() as stage:
        for p in paths:
            fig.savefig(stage(p), dpi=130)
    plt.close(fig)
    return paths


def check_arguments(models: list[str], counts: dict[str, int], saved_only: bool, stats_dir: str, outputs: dict) -> None:
    """Every option of :func:`main` checked before any model is loaded: the models (their saved statistics with
    ``saved_only``), counts of at least 1 (at most ``num_images`` oracle images), and where the outputs go.

    Raises:
        UserError: (or FileNotFoundError) naming the option and the value.
    """
    if not models:
        raise UserError("--models is empty; give at least one weights file")
    for path in models:
        cache = Path(stats_dir) / f"{Path(path).stem}.pt"
        if saved_only and not cache.is_file():
            raise FileNotFoundError(f"--saved_only: {path} has no saved statistics {cache}")
        if not saved_only:
            try:
                model_source(path)
            except ArgumentTypeError as err:
                raise UserError(f"--models: {err}") from None
    for option, value in counts.items():
        if value < 1:
            raise UserError(f"--{option} must be at least 1, got {value}")
    if counts["oracle_images"] > counts["num_images"]:
        raise UserError(
            f"--oracle_images {counts['oracle_images']} exceeds --num_images {counts['num_images']} (the oracle "
            "runs on the first of the images analysed)"
        )
    check_output_dir(stats_dir, "--stats_dir")
    for option, path in outputs.items():
        check_output_file(path, option)
    check_distinct_outputs(outputs)


def main(
    models: list[str],
    num_images: int = 2000,
    oracle_images: int = 1000,
    bootstrap: int = 2000,
    seed: int = 0,
    batch_size: int = 50,
    threads: int | None = None,
    stats_dir: str = str(RESULTS / "claims_stats"),
    output: str = str(RESULTS / "claims.json"),
    figure: str = str(RESULTS / "claims.png"),
    reuse: bool = True,
    saved_only: bool = False,
    data_root: str | None = None,
) -> dict:
    """Test the claims on every model in ``models`` (weights files), write ``output``, print the table, plot.

    Args:
        models: weights files (or Lightning checkpoints) loadable with ``attnprune.load_model``.
        num_images: first validation images of Fashion-MNIST analysed (never test images); (a) uses all of them.
        oracle_images: the first of these on which the leave-one-out oracle runs; (b) and (c) use them.
        bootstrap: bootstrap samples.
        seed: bootstrap seed.
        batch_size: images per forward.
        threads: torch CPU threads (default: torch's).
        stats_dir: where per-image statistics are saved (``<model stem>.pt``).
        output: the claims JSON.
        figure: the figure (``.png`` and ``.pdf``).
        reuse: load saved statistics of a model analysed with the same ``num_images`` (and run the oracle only on the
            images past those it was run on, up to ``oracle_images``).
        saved_only: run no model: use every model's saved statistics as they are (with as many oracle images as
            they hold).
        data_root: folder of the Fashion-MNIST IDX files (default: the data module's).
    """
    counts = {"num_images": num_images, "oracle_images": oracle_images, "bootstrap": bootstrap}
    counts |= {"batch_size": batch_size, "threads": threads or 1}
    figures = {"--figure": Path(figure).with_suffix(".png"), "--figure (its PDF)": Path(figure).with_suffix(".pdf")}
    check_arguments(models, counts, saved_only, stats_dir, {"--output": output, **figures})
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for model_path in models:
        cache = Path(stats_dir) / f"{Path(model_path).stem}.pt"
        saved = torch.load(cache, weights_only=False) if reuse and cache.is_file() else None
        if saved is not None and (saved["images"] != num_images or saved["oracle_images"] > oracle_images):
            saved = None
        if saved_only:
            saved = torch.load(cache, weights_only=False)
        stats = saved
        if not saved_only and (saved is None or saved["oracle_images"] < oracle_images):
            begin = 0 if saved is None else saved["oracle_images"]
            start = time.perf_counter()
            network = load_model(model_path)
            batches = validation_images(network, batch_size, data_root)
            print(f"{model_path}: oracle on images {begin}-{oracle_images} of {num_images}", flush=True)
            stats = collect(network, batches, num_images, oracle_images, oracle_from=begin)
            stats["model"] = model_path
            stats["seconds"] = time.perf_counter() - start
            stats["threads"] = torch.get_num_threads()
            if saved is not None:  # top up: the oracle statistics of the first images were saved
                stats["spearman"] = torch.cat([saved["spearman"], stats["spearman"]])
                for key in ("seconds", "oracle_s"):
                    stats[key] += saved[key]
            stats.pop("oracle_from")
            with atomic_path(cache) as tmp:  # saved as each model is done: a later failure keeps it
                torch.save(stats, tmp)
        start = time.perf_counter()
        result = claims(stats, bootstrap, seed)
        rows.append(
            {
                "model": Path(model_path).stem,
                "paradigm": stats["paradigm"],
                "claims": result,
                "file": model_path,
                "depth": stats["depth"],
                "images": stats["images"],
                "oracle_images": stats["oracle_images"],
                "analysis_seconds": round(stats["seconds"], 1),
                "bootstrap_seconds": round(time.perf_counter() - start, 2),
            }
        )
    out = {
        "models": rows,
        "across_models": across_models(rows),
        "settings": {
            "split": "Fashion-MNIST validation (5,000 training images held out, FashionMNISTDataModule seed 0)",
            "num_images": sorted({row["images"] for row in rows}),
            "oracle_images": sorted({row["oracle_images"] for row in rows}),
            "bootstrap": bootstrap,
            "seed": seed,
            "level": 0.95,
            "command": "benchmarks/claims.py (see the module docstring for the definitions)",
        },
    }
    print(table(rows))
    summary = out["across_models"]
    print(
        f"(c) across models: depths {summary['depths']}; the depth depends on the model (two 95% intervals apart): "
        f"{summary['depends_on_model']}; attention's lead is lost again in {summary['lead_not_kept']}"
    )
    paths = plot(rows, Path(figure))
    write_text_atomic(output, json.dumps(out, indent=1) + "\n")  # after the figure: a failed plot leaves the JSON
    print(f"wrote {output}, {', '.join(map(str, paths))}")
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(lambda argv: CLI(main, as_positional=False, args=argv, exit_on_error=False))
