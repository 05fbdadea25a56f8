"""Reference logits of the official MCTF code (mlvlab/MCTF), kept as a fixture.

MCTF's code is no dependency of attnprune: this script ran it once, and ``fixtures/mctf_official.safetensors`` holds
its logits, one tensor per case of :data:`CASES` (also in the file's metadata, with the commit and versions).
Regenerating them takes a checkout of https://github.com/mlvlab/MCTF at commit
2004da0cad3231fa74cbd60b6042b0bd133aacde outside this repository (for example in /tmp/official/mctf), then, from the
repository root: ``CUDA_VISIBLE_DEVICES= .venv/bin/python -m tests.mctf_reference /tmp/official/mctf``.

It builds the official ``models/deit.py`` ``VisionTransformer`` (whose blocks call ``utils/mctf.py``) with the
off-the-shelf DeiT-S settings of its README and ``run/eval_deit_s_mctf.sh`` (``mctf_type [r,0,0,1,1,1,20,40,1,1,0]``,
``task_type [1,0,0,0]``, ``r_evals [r]``) and each case's r and ``activate_layer``, loads the weights of a tiny timm
ViT with a class token (a seeded init of our own, :func:`seeded_vit`) and runs it in eval mode, fp32 on the CPU (TF32
off), as its ``engine.evaluate`` does: ``model(images, r_eval=r)``. The official code runs on timm 1.0 without
changes (its ``timm.models.layers``, ``helpers`` and ``registry`` imports still resolve, with deprecation warnings);
the one shim is the import path: the checkout's top-level packages ``models`` and ``utils``, which its modules import
by those names, are registered as packages of the checkout's folders.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from functools import partial
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tests.pitome_reference import seeded_weights

FIXTURE = Path(__file__).parent / "fixtures" / "mctf_official.safetensors"
COMMIT = "2004da0cad3231fa74cbd60b6042b0bd133aacde"
MODEL_FIELDS = ("depth", "embed_dim", "num_heads", "img_size", "patch_size")
CASES = {  # name -> the model's size, MCTF's r and its activate_layer (patch tokens: (img_size / patch_size) ** 2)
    "d3-w48-t64-r8": dict(depth=3, embed_dim=48, num_heads=3, img_size=32, patch_size=4, r=8, layers=[1, 2]),
    "d4-w64-t64-r16": dict(depth=4, embed_dim=64, num_heads=4, img_size=32, patch_size=4, r=16, layers=[1, 2, 3]),
    # 49 -> 29 -> 15 -> 9: half the tokens, then 10 tokens left, cap r
    "d4-w48-t49-r20": dict(depth=4, embed_dim=48, num_heads=3, img_size=28, patch_size=4, r=20, layers=[1, 2, 3]),
    "d5-w96-t64-r6": dict(depth=5, embed_dim=96, num_heads=6, img_size=48, patch_size=6, r=6, layers=[1, 2, 3, 4]),
    # merging from block 0, a block between merges (proportional attention without merging), an odd r
    "d6-w72-t81-r9": dict(depth=6, embed_dim=72, num_heads=3, img_size=36, patch_size=4, r=9, layers=[0, 1, 3, 4]),
    # 16 -> 12 -> 9 -> 9: the last block merges nothing (10 tokens left at most)
    "d4-w32-t16-r4": dict(depth=4, embed_dim=32, num_heads=2, img_size=32, patch_size=8, r=4, layers=[1, 2, 3]),
}


def seeded_vit(case: str, seed: int = 0) -> VisionTransformer:
    """The ViT of ``case`` (10 classes, class token) with the seeded weights of the PiToMe reference
    (:func:`tests.pitome_reference.seeded_weights`)."""
    model = VisionTransformer(**{key: CASES[case][key] for key in MODEL_FIELDS}, num_classes=10)
    return seeded_weights(model.eval(), seed)


def seeded_images(case: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    side = CASES[case]["img_size"]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def official_token_counts(case: str) -> list[int]:
    """Patch tokens entering each block and leaving the last under MCTF's code (``utils/mctf.py``): with ``t`` tokens
    (the class token included), ``r`` drops to ``t - 10`` where fewer than 10 would be left, then to half the patch
    tokens; a block outside ``activate_layer`` merges nothing."""
    spec = CASES[case]
    counts = [(spec["img_size"] // spec["patch_size"]) ** 2]
    for layer in range(spec["depth"]):
        n, r = counts[-1], spec["r"]
        if layer in spec["layers"]:
            counts.append(n - min(n + 1 - 10 if n + 1 - r < 10 else r, n // 2))
        else:
            counts.append(n)
    return counts


def load_official(root: Path) -> types.ModuleType:
    """``models/deit.py`` of the official checkout ``root``, its packages ``models`` and ``utils`` (whose
    ``__init__`` files are empty) registered as packages of the checkout's folders."""
    for package in ("models", "models.modules", "models.SA", "utils"):
        module = types.ModuleType(package)
        module.__path__ = [str(root.joinpath(*package.split(".")))]
        sys.modules[package] = module
    return importlib.import_module("models.deit")


def official_logits(deit: types.ModuleType, case: str) -> torch.Tensor:
    spec = CASES[case]
    model = deit.VisionTransformer(
        input_size=spec["img_size"],
        patch_size=spec["patch_size"],
        embed_dim=spec["embed_dim"],
        depth=spec["depth"],
        num_heads=spec["num_heads"],
        num_classes=10,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_mctf=True,
        mctf_type=[spec["r"], 0, 0, 1, 1, 1, 20, 40, 1, 1, 0],
        task_type=[1, 0, 0, 0],
        activate_layer=spec["layers"],
    ).eval()
    model.load_state_dict(seeded_vit(case).state_dict())
    with torch.no_grad():
        return model(seeded_images(case), r_eval=spec["r"]).contiguous()


def main() -> None:
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    deit = load_official(Path(sys.argv[1]))
    tensors = {case: official_logits(deit, case) for case in CASES}
    metadata = {"cases": json.dumps(CASES), "commit": COMMIT, "timm": timm.__version__, "torch": torch.__version__}
    save_file(tensors, FIXTURE, metadata=metadata)
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
