"""Figures at paper quality: labelled axes with units, legends clear of the data, a distinct colour and marker per
scorer, a key on token maps, a PDF beside every PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from attnprune import SCORERS, Routing
from attnprune.report import (
    plot_accuracy_vs_flops,
    plot_selectivity,
    plot_token_maps,
    reliability_figure,
    scorer_style,
    selectivity_figure,
    token_maps_figure,
)
from tests.conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "benchmarks" / "results" / "selectivity" / "fmnist_supervised" / "selectivity.json"


@pytest.fixture(scope="module")
def results() -> dict[str, list[float | None]]:
    return json.loads(SHIPPED.read_text())["metrics"]


def _clear_of_data(fig: plt.Figure, legend) -> bool:
    fig.canvas.draw()
    box = legend.get_window_extent()
    return not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.get_visible() and ax.axison)


def test_selectivity_axes_have_labels_with_units_and_legends_below(results):
    fig = selectivity_figure(results, "shipped")
    for ax in fig.axes:
        assert ax.get_xlabel() == "layer (0-based block index)"
        assert "(" in ax.get_ylabel() and ("0 to 1" in ax.get_ylabel() or "-1 to 1" in ax.get_ylabel())
        assert _clear_of_data(fig, ax.get_legend())
    plt.close(fig)


def test_every_scorer_has_its_own_colour_and_marker(results):
    styles = {scorer: scorer_style(scorer) for scorer in SCORERS}
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(SCORERS)
    assert len({s["color"] for s in styles.values()}) == len(SCORERS)  # colour alone tells them apart too
    fig = reliability_figure(results, "spearman")
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    measured = {k.removeprefix("reliability_spearman_") for k in results if k.startswith("reliability_spearman_")}
    assert set(lines) == measured  # the shipped results predate the cls_value scorer
    assert len({(line.get_color(), line.get_marker()) for line in lines.values()}) == len(measured)
    # l2_norm and std: distinct markers, dodged sideways, so neither hides the other
    assert lines["l2_norm"].get_marker() != lines["std"].get_marker()
    assert lines["l2_norm"].get_xdata()[0] != lines["std"].get_xdata()[0]
    assert ax.get_ylabel() == "Spearman correlation with the oracle (-1 to 1)"
    assert _clear_of_data(fig, ax.get_legend())
    plt.close(fig)


def test_token_maps_have_a_key():
    model = tiny_vit()
    routing = Routing.from_dict(
        {
            "name": "mixed",
            "rules": [{"layer": 1, "score": "l2_norm", "keep": 0.5}, {"layer": 2, "r": 4, "reduce": "merge"}],
        }
    )
    fig = token_maps_figure(model, torch.rand(2, 3, 32, 32), routing, mean=(0.0,) * 3, std=(1.0,) * 3)
    (key,) = fig.legends
    assert [text.get_text() for text in key.get_texts()] == [
        "kept as itself (image shown)",
        "merged or fused: one tint per shared token",
        "dropped",
    ]
    assert _clear_of_data(fig, key)
    plt.close(fig)


def test_every_plot_writes_a_pdf_beside_its_png(results, tmp_path):
    # (plot_reliability saves through the same save_figure; analyze.py's test checks it writes both too)
    model = tiny_vit()
    paths = [
        plot_selectivity(results, tmp_path / "selectivity.png"),
        plot_token_maps(model, torch.rand(1, 3, 32, 32), Routing.evit(0.5, (1, 2)), tmp_path / "tokens.png", 0.0, 1.0),
        plot_accuracy_vs_flops(
            [{"routing": "unpruned", "gflops": 1.0, "top1": 80.0, "model": "m"}], tmp_path / "top1_vs_gflops.png"
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
