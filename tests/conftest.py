"""Shared test helpers: tiny timm ViTs and random valid routings."""

from __future__ import annotations

import random

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from attnprune import REDUCERS, SCORERS, Routing

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A depth-4, width-48 ViT on 32 px images (64 patch tokens), random init, eval mode."""
    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY, **overrides}).eval()


def random_routing(rng: random.Random, depth: int, class_token: bool = True) -> Routing:
    """A valid routing drawing layers, scorers, reducers and keep/r at random (fits 64 patch tokens)."""
    scorers = sorted(name for name, s in SCORERS.items() if class_token or not s.needs_class_token)
    layers = sorted(rng.sample(range(depth), rng.randint(1, depth)))
    rules = []
    for layer in layers:
        reduce = rng.choice(sorted(REDUCERS))
        rule = {"layer": layer, "reduce": reduce}
        if reduce != "merge":
            rule["score"] = rng.choice(scorers)
        if rng.random() < 0.5:
            rule["keep"] = rng.choice([0.5, 0.6, 0.75, 0.9, 1.0])
        else:
            rule["r"] = rng.randint(0, 8)
        rules.append(rule)
    return Routing.from_dict({"name": "random-valid", "rules": rules, "seed": rng.randint(0, 99)})


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
