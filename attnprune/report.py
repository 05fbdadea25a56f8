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
from torch import Tensor, nn  # noqa: E402

from attnprune.routing import Routing  # noqa: E402
from attnprune.scoring import SCORERS  # noqa: E402
from attnprune.vit import forward_tokens, prune  # noqa: E402

__all__ = [
    "write_tables",
    "plot_selectivity",
    "plot_reliability",
    "plot_token_maps",
    "plot_accuracy_vs_flops",
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_vs_flops(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Top-1 (%) against GFLOPs, one labelled point per routing (evaluate.py's rows); PNG and PDF."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = "os^Dv<>pP*Xh"
    colours = plt.get_cmap("tab10").colors
    for i, row in enumerate(rows):
        ax.scatter(
            row["gflops"],
            row["top1"],
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
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: [None if math.isnan(v) else v for v in values] for k, values in results.items()}
    (out_dir / "selectivity.json").write_text(json.dumps({"meta": meta or {}, "metrics": clean}, indent=2))
    with open(out_dir / "selectivity.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "layer", "value"])
        for metric, values in sorted(clean.items()):
            writer.writerows([metric, layer, value] for layer, value in enumerate(values))


def plot_selectivity(results: dict[str, list[float | None]], path: Path, title: str = "") -> Path:
    """One panel per metric group (concentration of CLS / all queries, stability), each metric against depth."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8), squeeze=False)
    for ax, (panel, names) in zip(axes[0], PANELS.items(), strict=True):
        for name in names:
            if name in results:
                values = [math.nan if v is None else v for v in results[name]]
                ax.plot(range(len(values)), values, marker="o", label=name.removeprefix("cls_").removeprefix("all_"))
        ax.set(title=panel, xlabel="layer", ylim=(-0.05, 1.05) if "concentration" in panel else None)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(
    results: dict[str, list[float | None]], path: Path, kind: str = "spearman", title: str = ""
) -> Path:
    """Agreement of every scorer with the oracle importance against depth, one line per scorer (attention solid)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    prefix = f"reliability_{kind}_"
    for key in sorted(k for k in results if k.startswith(prefix)):
        scorer = key.removeprefix(prefix)
        values = [math.nan if v is None else v for v in results[key]]
        attention = SCORERS[scorer].family == "attention" if scorer in SCORERS else False
        ax.plot(
            range(len(values)),
            values,
            marker="o",
            linestyle="-" if attention else "--",
            linewidth=2.2 if attention else 1.2,
            label=scorer,
        )
    ax.set(xlabel="layer", ylabel=f"oracle agreement ({kind})", title=title or f"scorer reliability ({kind})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


@torch.no_grad()
def plot_token_maps(model: nn.Module, images: Tensor, routing: Routing, path: Path, mean: Any, std: Any) -> Path:
    """One row per image, one column per pruning layer: patches that survive as themselves are shown as they are,
    dropped patches are dark red, and patches merged or fused into a shared token are tinted with that token's
    colour."""
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
            dropped = torch.tensor([0.55, 0.0, 0.0])  # dark red, visible on black backgrounds too
            rgb = torch.where(_upsample(owner < 0, rgb)[..., None], 0.3 * rgb + 0.7 * dropped, rgb)
            axes[row, col].imshow(rgb.clamp(0, 1))
            if row == 0:
                kept = sources[layer].shape[1] - pruned.num_prefix_tokens
                axes[row, col].set_title(f"after layer {layer}: {kept} tokens", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(routing.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
