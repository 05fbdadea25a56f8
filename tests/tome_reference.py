"""Reference logits of the official ToMe timm patch (facebookresearch/ToMe), kept as a fixture.

The official package is not a dependency, so its logits were computed once by hand and stored in
``fixtures/tome_official.safetensors``. To regenerate them (needs a checkout of facebookresearch/ToMe):

    PYTHONPATH=/path/to/ToMe .venv/bin/python tests/tome_reference.py

The weights are a seeded random init of our own, so the fixture does not depend on timm's initialisers.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch import nn

FIXTURE = Path(__file__).parent / "fixtures" / "tome_official.safetensors"
CASES = {  # model name -> ToMe's r
    "deit_tiny_patch16_224": 16,
    "deit_small_patch16_224": 13,
    "deit_tiny_distilled_patch16_224": 16,
    "deit_small_distilled_patch16_224": 13,
}


def seeded_model(name: str, seed: int = 0) -> nn.Module:
    """``name`` with weights drawn from one seeded generator: N(0, 0.05) everywhere, norms' scales N(1, 0.1)."""
    model = timm.create_model(name, pretrained=False).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_scale = pname.endswith(".weight") and param.ndim == 1
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise)
    return model


def seeded_images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    import tome  # the official implementation, from PYTHONPATH
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, r in CASES.items():
        model = seeded_model(name)
        tome.patch.timm(model)
        model.r = r
        with torch.no_grad():
            tensors[name] = model(seeded_images()).contiguous()
        meta[name] = str(r)
    meta["timm"] = timm.__version__
    save_file(tensors, FIXTURE, metadata={"r": json.dumps({k: CASES[k] for k in CASES}), "timm": timm.__version__})
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
