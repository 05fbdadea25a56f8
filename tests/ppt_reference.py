"""Reference logits of the official PPT code (xjwu1024/PPT), kept as a fixture.

The official code is not a dependency, so its logits were computed once and stored in
``fixtures/ppt_official.safetensors`` (the cases, and which images each PPT block pruned, in its metadata). To
regenerate them, get the official code at commit 706bcdd475b5652ee84117a88add7a3a49c6045b outside this repository
and point the script at it:

    git clone https://github.com/xjwu1024/PPT /tmp/official/ppt
    git -C /tmp/official/ppt checkout 706bcdd475b5652ee84117a88add7a3a49c6045b
    CUDA_VISIBLE_DEVICES= .venv/bin/python -m tests.ppt_reference /tmp/official/ppt

It runs ``ppt_deit.py``'s ``apply_patch(model, prop_attn=True, pp_loc_list=layers, threshold=threshold)`` and sets
``model.r = r``, as the official ``main.py`` does, in fp32 on the CPU (TF32 off), on tiny timm ViTs with a class
token whose weights are a seeded init of our own (:func:`seeded_vit`). The official code was written for timm 0.4.12
but runs unchanged on timm 1.0 (its blocks and attention replace timm's ``forward``, reading only attributes timm 1.0
still has). The one shim: ``ppt_deit.py`` imports ``from tome import ...``, meaning the ``tome.py`` beside it, so both
files are loaded from the checkout by path, that ``tome.py`` registered as the module ``tome`` (never a ToMe package
installed elsewhere).

For every case the script also records, per PPT block, how many images the official code pruned (the others
merged) and checks that no image's score variance lies within 0.1% of the threshold, where rounding could flip its
branch; the mixed cases must prune some images and merge others in at least one block.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

FIXTURE = Path(__file__).parent / "fixtures" / "ppt_official.safetensors"
COMMIT = "706bcdd475b5652ee84117a88add7a3a49c6045b"
BATCH = 8
CASES = {  # name -> the model (patch tokens: (img_size / patch_size) ** 2) and PPT's r, blocks and threshold
    "d4-w48-t64-r8-prune": dict(
        depth=4, embed_dim=48, num_heads=3, img_size=32, patch_size=4, r=8, layers=[1, 2, 3], threshold=0.0
    ),
    "d4-w48-t64-r8-pool": dict(
        depth=4, embed_dim=48, num_heads=3, img_size=32, patch_size=4, r=8, layers=[1, 2, 3], threshold=1.0
    ),
    "d4-w48-t64-r8-mix": dict(
        depth=4, embed_dim=48, num_heads=3, img_size=32, patch_size=4, r=8, layers=[1, 2, 3], threshold=9e-5
    ),
    "d5-w64-t64-r12-mix": dict(
        depth=5, embed_dim=64, num_heads=4, img_size=32, patch_size=4, r=12, layers=[1, 3], threshold=1.3e-4
    ),
    "d6-w96-t64-r10-mix": dict(
        depth=6, embed_dim=96, num_heads=6, img_size=64, patch_size=8, r=10, layers=[1, 2, 4], threshold=4.9e-5
    ),
    "d6-w72-t36-r9-mix": dict(
        depth=6, embed_dim=72, num_heads=3, img_size=48, patch_size=8, r=9, layers=[0, 3, 5], threshold=2.5e-4
    ),
    "d5-w48-t49-r6-prune": dict(
        depth=5, embed_dim=48, num_heads=2, img_size=56, patch_size=8, r=6, layers=[2, 3, 4], threshold=0.0
    ),
    "d5-w48-t49-r6-pool": dict(
        depth=5, embed_dim=48, num_heads=2, img_size=56, patch_size=8, r=6, layers=[2, 3, 4], threshold=1.0
    ),
    # r=8 at block 2 is more than the 8 tokens left can lose: PPT's code removes 4 there (Routing.ppt's num_tokens)
    "d4-w64-t16-r8-mix": dict(
        depth=4, embed_dim=64, num_heads=4, img_size=32, patch_size=8, r=8, layers=[1, 2], threshold=1.2e-3
    ),
}


def seeded_vit(case: str, seed: int = 0) -> VisionTransformer:
    """The ViT of ``case`` (10 classes, class token) with weights from one seeded generator: each matrix N(0, 1 /
    fan-in), the class token and position embedding N(0, 1), the norms' scales N(1, 0.1), other vectors N(0, 0.05)."""
    spec = CASES[case]
    model = VisionTransformer(
        **{key: spec[key] for key in ("depth", "embed_dim", "num_heads", "img_size", "patch_size")}, num_classes=10
    ).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean, std = 0.0, 0.05
            if name in ("cls_token", "pos_embed"):
                std = 1.0
            elif param.ndim > 1:
                std = 1 / math.sqrt(param[0].numel())
            elif "norm" in name and name.endswith(".weight"):
                mean, std = 1.0, 0.1
            param.copy_(mean + std * torch.randn(param.shape, generator=generator))
    return model


def seeded_images(case: str, seed: int = 1) -> torch.Tensor:
    side = CASES[case]["img_size"]
    return torch.randn(BATCH, 3, side, side, generator=torch.Generator().manual_seed(seed))


def load_official(root: Path) -> types.ModuleType:
    """``ppt_deit.py`` of the official checkout ``root``, with the ``tome.py`` beside it as its ``tome``."""
    for name in ("tome", "ppt_deit"):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["ppt_deit"]


def official_logits(ppt_deit: types.ModuleType, case: str) -> tuple[torch.Tensor, list[int], float]:
    """The official logits of ``case``, the images pruned in each PPT block, and the smallest distance of an
    image's score variance from the threshold, relative to the threshold (inf when it is 0: every image prunes)."""
    spec = CASES[case]
    model = seeded_vit(case)
    ppt_deit.apply_patch(model, prop_attn=True, pp_loc_list=spec["layers"], threshold=spec["threshold"])
    model.r = spec["r"]
    pruned, margin = [], math.inf

    def record(module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        nonlocal margin
        variance = output[2][:, 1:].var(dim=1)  # the official block's own decision: var >= threshold prunes
        pruned.append(int((variance >= spec["threshold"]).sum()))
        if spec["threshold"] > 0:
            margin = min(margin, float(((variance - spec["threshold"]).abs() / spec["threshold"]).min()))

    for layer in spec["layers"]:
        model.blocks[layer].attn.register_forward_hook(record)
    with torch.no_grad():
        logits = model(seeded_images(case))
    return logits.contiguous(), pruned, margin


def main() -> None:
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ppt_deit = load_official(Path(sys.argv[1]))
    tensors, pruned = {}, {}
    for case in CASES:
        tensors[case], pruned[case], margin = official_logits(ppt_deit, case)
        print(case, "images pruned per PPT block:", pruned[case], f"threshold margin {margin:.3g}")
        assert margin > 1e-3, f"{case}: an image's variance is too close to the threshold"
        expected = {"prune": lambda p: p == BATCH, "pool": lambda p: p == 0, "mix": lambda p: 0 < p < BATCH}
        check = all if not case.endswith("mix") else any
        assert check(map(expected[case.rsplit("-", 1)[1]], pruned[case])), f"{case}: pruned {pruned[case]}"
    metadata = {
        "cases": json.dumps(CASES),
        "pruned": json.dumps(pruned),
        "commit": COMMIT,
        "timm": timm.__version__,
        "torch": torch.__version__,
    }
    save_file(tensors, FIXTURE, metadata=metadata)
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
