"""Reference logits of the official PiToMe timm patch (hchautran/PiToMe), kept as a fixture.

PiToMe's code is no dependency of attnprune: this script ran it once, and ``fixtures/pitome_official.safetensors``
holds its logits, one tensor per case of :data:`CASES` (also in the file's metadata, with the commit and versions).
Regenerating them takes a checkout of https://github.com/hchautran/PiToMe at commit
550b5deed94aadfeac28bfbe381d87e672044a40 outside this repository (for example in /tmp/official/pitome), then, from
the repository root: ``CUDA_VISIBLE_DEVICES= .venv/bin/python -m tests.pitome_reference /tmp/official/pitome``.

It runs ``algo/pitome/patch/deit.py``'s ``apply_patch`` and sets ``model.ratio``, in fp32 on the CPU (TF32 off), on
tiny timm ViTs with a class token whose weights are a seeded init of our own (:func:`seeded_vit`). The official
code was written for an old timm (0.4); the shims, all here, are:

- only ``algo/pitome/merge.py`` and ``algo/pitome/patch/{timm,deit}.py`` are imported (as the package
  ``pitome_official``), not the package ``__init__`` files, which import the vision-language patches and their
  dependencies;
- the model is a :class:`OldTimmVisionTransformer`: timm 1.0's ``VisionTransformer`` with the attributes the patch
  reads from timm 0.4's (``dist_token = None``, ``pre_logits``) and timm 0.4's ``forward``, the head applied to
  ``forward_features`` (which the patch replaces by one returning the class token); timm 1.0's ``forward`` passes
  arguments that the patched ``forward_features`` does not take, and its head would pool the pooled token again;
- the patched model returns ``(logits, flops)``: the logits are kept.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

FIXTURE = Path(__file__).parent / "fixtures" / "pitome_official.safetensors"
COMMIT = "550b5deed94aadfeac28bfbe381d87e672044a40"
CASES = {  # name -> the model's size and PiToMe's ratio (patch tokens: (img_size / patch_size) ** 2)
    "d3-w48-t16-r0.9": dict(depth=3, embed_dim=48, num_heads=3, img_size=32, patch_size=8, ratio=0.9),
    "d4-w64-t64-r0.8": dict(depth=4, embed_dim=64, num_heads=4, img_size=32, patch_size=4, ratio=0.8),
    "d4-w48-t64-r0.5": dict(depth=4, embed_dim=48, num_heads=3, img_size=32, patch_size=4, ratio=0.5),
    "d5-w96-t64-r0.7": dict(depth=5, embed_dim=96, num_heads=6, img_size=48, patch_size=6, ratio=0.7),
    "d6-w72-t64-r0.6": dict(depth=6, embed_dim=72, num_heads=3, img_size=64, patch_size=8, ratio=0.6),
    "d7-w48-t81-r0.83": dict(depth=7, embed_dim=48, num_heads=2, img_size=36, patch_size=4, ratio=0.83),
}


def seeded_vit(case: str, seed: int = 0) -> VisionTransformer:
    """The ViT of ``case`` (10 classes, class token) with weights from one seeded generator: matrices N(0, 1 /
    fan-in), class token and position embedding N(0, 0.5), norm scales N(1, 0.1), biases N(0, 0.02)."""
    spec = {key: value for key, value in CASES[case].items() if key != "ratio"}
    return seeded_weights(VisionTransformer(**spec, num_classes=10).eval(), seed)


def seeded_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with the weights :func:`seeded_vit` describes, from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name in ("cls_token", "pos_embed"):
                param.copy_(0.5 * noise)
            elif param.ndim > 1:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name.endswith(".weight"):  # the norms' scales, the only vectors named weight
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.02 * noise)
    return model


def seeded_images(case: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    side = CASES[case]["img_size"]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def official_token_counts(tokens: int, ratio: float, depth: int) -> list[int]:
    """Patch tokens entering each block and leaving the last under PiToMe's code: ``r = floor(T - T * ratio)``."""
    counts = [tokens]
    for _ in range(depth):
        counts.append(counts[-1] - (math.floor(counts[-1] - counts[-1] * ratio) if ratio < 1 else 0))
    return counts


class OldTimmVisionTransformer(VisionTransformer):
    """timm 1.0's ViT with what PiToMe's patch expects of timm 0.4's (see the module docstring)."""

    dist_token = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def load_official(root: Path) -> types.ModuleType:
    """``algo/pitome/patch/deit.py`` of the official checkout ``root``, imported without the package ``__init__``."""
    base = root / "algo" / "pitome"
    for package, folder in (("pitome_official", base), ("pitome_official.patch", base / "patch")):
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]
        sys.modules[package] = module
    return importlib.import_module("pitome_official.patch.deit")


def official_logits(deit_patch: types.ModuleType, case: str) -> torch.Tensor:
    model = seeded_vit(case)
    model.__class__ = OldTimmVisionTransformer
    model.pre_logits = nn.Identity()
    deit_patch.apply_patch(model)
    model.ratio = CASES[case]["ratio"]
    with torch.no_grad():
        logits, _flops = model(seeded_images(case))
    return logits.contiguous()


def main() -> None:
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    deit_patch = load_official(Path(sys.argv[1]))
    tensors = {}
    for case, spec in CASES.items():
        tokens = (spec["img_size"] // spec["patch_size"]) ** 2
        counts = official_token_counts(tokens, spec["ratio"], spec["depth"])
        print(case, "patch tokens per block:", counts)
        tensors[case] = official_logits(deit_patch, case)
    metadata = {"cases": json.dumps(CASES), "commit": COMMIT, "timm": timm.__version__, "torch": torch.__version__}
    save_file(tensors, FIXTURE, metadata=metadata)
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
