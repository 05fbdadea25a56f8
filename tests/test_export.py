"""Static token counts make pruned models compile and export like any dense model."""

import torch

from attnprune import Routing, prune
from tests.conftest import tiny_vit

MIXED = Routing.from_dict(
    {
        "name": "mixed",
        "rules": [
            {"layer": 0, "score": "l2_norm", "keep": 0.75, "reduce": "drop"},
            {"layer": 1, "r": 8, "reduce": "merge"},
            {"layer": 2, "score": "cls_attention", "keep": 0.5, "reduce": "fuse"},
        ],
    }
)


def test_torch_export_matches_eager(images):
    model = prune(tiny_vit(), MIXED)
    with torch.no_grad():
        eager = model(images)
        exported = torch.export.export(model, (images,))
        torch.testing.assert_close(exported.module()(images), eager, atol=1e-4, rtol=1e-4)


def test_torch_compile_matches_eager(images):
    model = prune(tiny_vit(reg_tokens=2, global_pool="avg", fc_norm=True), MIXED)
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(images), eager, atol=1e-4, rtol=1e-4)
