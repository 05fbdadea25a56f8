"""Tables and plots of the selectivity analysis, and token maps of what a routing keeps."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from attnprune.atomic import staged_files  # noqa: E402
from attnprune.routing import Routing  # noqa: E402
from attnprune.scoring import SCORERS  # noqa: E402
from attnprune.vit import forward_tokens, prune  # noqa: E402

__all__ = [
    "write_tables",
    "plot_selectivity",
    "plot_reliability",
    "plot_token_maps",
    "plot_accuracy_vs_flops",
    "selectivity_figure",
    "reliability_figure",
    "token_maps_figure",
    "scorer_style",
    "membership_map",
    "save_figure",
]

PANELS = {
    "concentration of CLS attention": (
        "cls_normalized_entropy",
        "cls_gini",
        "cls_topk_mass",
        "cls_effective_share",
        "cls_max_weight",
    ),
    "concentration of all queries' attention": (
        "all_normalized_entropy",
        "all_gini",
        "all_topk_mass",
        "all_effective_share",
        "all_max_weight",
    ),
    "stability of the CLS-attention ranking": (
        "head_agreement",
        "noise_stability",
        "flip_stability",
        "layer_stability",
    ),
}


def save_figure(fig: plt.Figure, path: Path, dpi: int = 150) -> Path:
    """Save ``fig`` as ``path`` (PNG) and as a PDF beside it (same stem), then close it; returns ``path``."""
    path = Path(path)
    try:
        with staged_files() as stage:  # both files, or neither
            fig.savefig(stage(path), dpi=dpi, bbox_inches="tight")
            fig.savefig(stage(path.with_suffix(".pdf")), bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_accuracy_vs_flops(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Top-1 against GFLOPs, one labelled point per routing (evaluate.py's rows, top-1 as a fraction; plotted in
    percent); PNG and PDF."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = "os^Dv<>pP*Xh"
    colours = plt.get_cmap("tab10").colors
    for i, row in enumerate(rows):
        ax.scatter(
            row["gflops"],
            100.0 * row["top1"],
            marker=markers[i % len(markers)],
            color=colours[i % 10],
            s=50,
            label=row["routing"],
        )
    ax.set(xlabel="GFLOPs per image (1 FLOP = 1 multiply-accumulate)", ylabel="top-1 accuracy (%)")
    ax.set_title(title or (rows[0]["model"] if rows else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return save_figure(fig, path)


def write_tables(results: dict[str, list[float]], out_dir: Path, meta: dict[str, Any] | None = None) -> None:
    """``selectivity.json`` (``{"meta": ..., "metrics": {metric: [per layer]}}``) and ``selectivity.csv``
    (metric, layer, value)."""
    clean = {k: [None if math.isnan(v) else v for v in values] for k, values in results.items()}
    with staged_files() as stage:
        stage(out_dir / "selectivity.json").write_text(json.dumps({"meta": meta or {}, "metrics": clean}, indent=2))
        with open(stage(out_dir / "selectivity.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "layer", "value"])
            for metric, values in sorted(clean.items()):
                writer.writerows([metric, layer, value] for layer, value in enumerate(values))


PANEL_AXES = {
    "concentration of CLS attention": "concentration (unitless, 0 to 1)",
    "concentration of all queries' attention": "concentration (unitless, 0 to 1)",
    "stability of the CLS-attention ranking": "rank correlation (Spearman, -1 to 1)",
}
LAYER_AXIS = "layer (0-based block index)"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "d", "H", "8")
# Okabe-Ito's colour-blind-safe palette, then tab10's; with the markers, every scorer gets its own pair.
COLOURS = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#9467bd",
    "#8c564b",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#F0E442",
    "#8B0000",
    "#2F4F4F",
)


def scorer_style(scorer: str) -> dict[str, Any]:
    """A fixed colour and marker for ``scorer`` (the same in every figure); attention scorers are drawn solid and
    thick, the others dashed."""
    names = sorted(SCORERS)
    i = names.index(scorer) if scorer in names else len(names) + sum(map(ord, scorer))
    attention = scorer in SCORERS and SCORERS[scorer].family == "attention"
    return {
        "color": COLOURS[i % len(COLOURS)],
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": "-" if attention else "--",
        "linewidth": 2.2 if attention else 1.2,
    }


def _series(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def selectivity_figure(results: dict[str, list[float | None]], title: str = "") -> plt.Figure:
    """One panel per metric group (concentration of CLS / all queries, stability), each metric against depth; each
    panel's legend sits below it, clear of the data."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.4), squeeze=False)
    for ax, (panel, names) in zip(axes[0], PANELS.items(), strict=True):
        for i, name in enumerate(names):
            if name in results:
                values = _series(results[name])
                label = name.removeprefix("cls_").removeprefix("all_").replace("_", " ")
                ax.plot(range(len(values)), values, marker=MARKERS[i], color=COLOURS[i], label=label)
        ax.set_title(panel, fontsize=10)
        ax.set(xlabel=LAYER_AXIS, ylabel=PANEL_AXES[panel])
        ax.set_ylim(-0.05, 1.05) if "concentration" in panel else ax.set_ylim(-1.05, 1.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_selectivity(results: dict[str, list[float | None]], path: Path, title: str = "") -> Path:
    """:func:`selectivity_figure` as ``path`` (PNG) and a PDF beside it."""
    return save_figure(selectivity_figure(results, title), path)


def reliability_figure(results: dict[str, list[float | None]], kind: str = "spearman", title: str = "") -> plt.Figure:
    """Agreement of every scorer with the oracle importance against depth: one colour and marker per scorer
    (attention solid), points dodged sideways so that equal values stay visible, the legend right of the axes."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    prefix = f"reliability_{kind}_"
    keys = sorted(k for k in results if k.startswith(prefix))
    for i, key in enumerate(keys):
        scorer = key.removeprefix(prefix)
        values = _series(results[key])
        dodge = 0.3 * (i / max(len(keys) - 1, 1) - 0.5)
        ax.plot([layer + dodge for layer in range(len(values))], values, label=scorer, **scorer_style(scorer))
    ylabel = "Spearman correlation with the oracle (-1 to 1)" if kind == "spearman" else "top-k overlap with the oracle"
    ax.set(xlabel=LAYER_AXIS, ylabel=ylabel if kind == "spearman" else f"{ylabel} (fraction, 0 to 1)")
    ax.set_title(title or f"scorer reliability ({kind})", fontsize=10)
    ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="scorer")
    fig.tight_layout()
    return fig


def plot_reliability(
    results: dict[str, list[float | None]], path: Path, kind: str = "spearman", title: str = ""
) -> Path:
    """:func:`reliability_figure` as ``path`` (PNG) and a PDF beside it."""
    return save_figure(reliability_figure(results, kind, title), path)


def membership_map(source: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """For each input patch, the index of the token it now belongs to (``-1`` where it was dropped), ``[B, h, w]``.

    Args:
        source: ``[B, T, T0]`` token membership from :func:`attnprune.vit.forward_tokens`.
        num_prefix: prefix tokens.
        grid: the patch grid.
    """
    patches = source[:, :, num_prefix:]  # [B, T, N0]
    owner = patches.argmax(dim=1)
    owner[patches.amax(dim=1) <= 0] = -1
    return owner.view(-1, *grid)


def _upsample(grid_values: Tensor, like: Tensor) -> Tensor:
    """Repeat each patch's value over its pixels."""
    rows, cols = like.shape[0] // grid_values.shape[0], like.shape[1] // grid_values.shape[1]
    return grid_values.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


DROPPED = (0.55, 0.0, 0.0)  # dark red, visible on black backgrounds too


@torch.no_grad()
def token_maps_figure(model: nn.Module, images: Tensor, routing: Routing, mean: Any, std: Any) -> plt.Figure:
    """One row per image, one column per pruning layer: patches that survive as themselves are shown as they are,
    dropped patches are dark red, and patches merged or fused into a shared token are tinted with that token's
    colour; a key under the maps says so."""
    pruned = prune(copy.deepcopy(model).eval(), routing)
    sources: list[Tensor] = []
    forward_tokens(pruned, images, sources=sources)
    layers = [rule.layer for rule in routing.rules]
    grid = pruned.patch_embed.dynamic_feat_size(images.shape[-2:])
    mean = torch.as_tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype).view(-1, 1, 1)
    pictures = (images * std + mean).clamp(0, 1).mean(dim=1)  # grayscale background [B, H, W]
    colours = torch.tensor(plt.get_cmap("tab20").colors)
    fig, axes = plt.subplots(
        len(images), len(layers) + 1, figsize=(2.2 * (len(layers) + 1), 2.2 * len(images)), squeeze=False
    )
    for row, picture in enumerate(pictures):
        axes[row, 0].imshow(picture, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_title("input" if row == 0 else "", fontsize=8)
        for col, layer in enumerate(layers, start=1):
            owner = membership_map(sources[layer], pruned.num_prefix_tokens, grid)[row]
            counts = torch.bincount(owner[owner >= 0].flatten(), minlength=sources[layer].shape[1])
            shared = (owner >= 0) & (counts[owner.clamp_min(0)] > 1)
            tint = colours[owner.clamp_min(0) % len(colours)]  # [h, w, 3]
            rgb = picture[..., None].repeat(1, 1, 3)
            rgb = torch.where(_upsample(shared, rgb)[..., None], 0.45 * rgb + 0.55 * _upsample(tint, rgb), rgb)
            rgb = torch.where(_upsample(owner < 0, rgb)[..., None], 0.3 * rgb + 0.7 * torch.tensor(DROPPED), rgb)
            axes[row, col].imshow(rgb.clamp(0, 1))
            if row == 0:
                kept = sources[layer].shape[1] - pruned.num_prefix_tokens
                axes[row, col].set_title(f"after layer {layer}: {kept} tokens", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(routing.name, fontsize=10)
    key = [
        Patch(facecolor="0.6", edgecolor="0.3", label="kept as itself (image shown)"),
        Patch(facecolor=colours[0].tolist(), edgecolor="0.3", label="merged or fused: one tint per shared token"),
        Patch(facecolor=DROPPED, edgecolor="0.3", label="dropped"),
    ]
    fig.tight_layout(rect=(0, 0.08 if len(images) < 3 else 0.05, 1, 1))
    fig.legend(handles=key, loc="lower center", ncol=len(key), fontsize=7, frameon=False)
    return fig


def plot_token_maps(model: nn.Module, images: Tensor, routing: Routing, path: Path, mean: Any, std: Any) -> Path:
    """:func:`token_maps_figure` as ``path`` (PNG) and a PDF beside it."""
    return save_figure(token_maps_figure(model, images, routing, mean, std), path, dpi=130)


def redraw(folder: Path) -> list[Path]:
    """Draw ``selectivity.png`` and ``reliability.png`` (with PDFs) again from a folder's ``selectivity.json``."""
    folder = Path(folder)
    saved = json.loads((folder / "selectivity.json").read_text())
    results = {k: [math.nan if v is None else v for v in values] for k, values in saved["metrics"].items()}
    name = Path(saved.get("meta", {}).get("model") or folder.name).stem
    paths = [plot_selectivity(results, folder / "selectivity.png", title=name)]
    if any(k.startswith("reliability_spearman_") for k in results):
        paths.append(plot_reliability(results, folder / "reliability.png", title=f"{name}: scorer reliability"))
    return paths


if __name__ == "__main__":  # python -m attnprune.report benchmarks/results/selectivity/fmnist_*
    import sys

    for argument in sys.argv[1:]:
        print(*redraw(Path(argument)))
