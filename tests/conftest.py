"""Shared test helpers: tiny timm ViTs and random valid routings."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access here: fail fast instead of waiting on the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from attnprune import REDUCERS, SCORERS, Routing
from attnprune.lit.backbone import Backbone

# no tqdm monitor thread: mutmut forks a process per mutant, and a fork taken while that thread holds tqdm's lock
# leaves the child waiting on it forever
tqdm.monitor_interval = 0

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a script run as a user runs it, offline: no W&B variables (no key), no traceback switch,
    the hub and ``datasets`` offline, this checkout importable; ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ATTNPRUNE_DEBUG"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A depth-4, width-48 ViT on 32 px images (64 patch tokens), random init, eval mode."""
    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY, **overrides}).eval()


def assert_matches_official(ours: torch.Tensor, unpruned: torch.Tensor, reference: torch.Tensor) -> None:
    """Our pruned logits equal an official implementation's ``reference`` within 1e-5 of the logit scale, with the
    same top-1, and the reference is not just the unpruned model's logits."""
    scale = reference.abs().max()
    assert (unpruned - reference).abs().max() > 1e-2 * scale  # the fixture is not trivially the unpruned model
    assert (ours - reference).abs().max() <= 1e-5 * scale
    assert torch.equal(ours.argmax(dim=-1), reference.argmax(dim=-1))


def official_fixture_commit(fixture: Path, cases: dict) -> str:
    """The commit of the official code a reference fixture was made with, after checking that it holds exactly
    ``cases`` (as tensors and in its metadata)."""
    from safetensors import safe_open

    with safe_open(fixture, "pt") as opened:
        metadata = opened.metadata()
        assert sorted(opened.keys()) == sorted(cases)
    assert json.loads(metadata["cases"]) == cases
    return metadata["commit"]


def random_routing(rng: random.Random, depth: int, class_token: bool = True) -> Routing:
    """A valid routing drawing layers, scorers, reducers and keep/r at random (fits 64 patch tokens)."""
    scorers = sorted(name for name, s in SCORERS.items() if class_token or not s.needs_class_token)
    layers = sorted(rng.sample(range(depth), rng.randint(1, depth)))
    rules = []
    for layer in layers:
        reduce = rng.choice(sorted(name for name, r in REDUCERS.items() if not r.required))
        rule = {"layer": layer, "reduce": reduce}
        if REDUCERS[reduce].takes_score:
            rule["score"] = rng.choice(scorers)
        if rng.random() < 0.5:
            rule["keep"] = rng.choice([0.5, 0.6, 0.75, 0.9, 1.0])
        else:
            rule["r"] = rng.randint(0, 8)
        rules.append(rule)
    return Routing.from_dict({"name": "random-valid", "rules": rules, "seed": rng.randint(0, 99)})


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """Entry points run in-process switch gradients off globally (inference only); later tests train."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# the fields of a Backbone (attnprune.lit.backbone): a depth-4, width-32 classifier of 16 px images
TINY_BACKBONE = {
    "model": "vit_tiny_patch16_224",
    "num_classes": 3,
    "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2},
    "pretrained_cfg": {"input_size": [3, 16, 16], "crop_pct": 1.0},
}


def tiny_backbone(**fields) -> Backbone:
    """The tiny classifier's :class:`Backbone`, with ``fields`` replaced (``routing``, ``paradigm``, ...)."""
    return Backbone(**{**TINY_BACKBONE, **fields})


def make_image_folder(root: Path, train_per_class: int = 8, test_per_class: int = 4, classes: int = 3) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: 16 px images whose colour depends on the class,
    in RGB, grayscale (L) and CMYK modes."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "CMYK"]
    for split, count in (("train", train_per_class), ("val", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (16, 16, 3)) + np.eye(3, dtype=int)[c] * 180
                image = Image.fromarray(pixels.astype(np.uint8), "RGB").convert(modes[i % 3])
                image.save(folder / f"{i}.{'jpg' if image.mode == 'CMYK' else 'png'}")
    return root
