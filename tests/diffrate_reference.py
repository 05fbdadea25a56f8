"""Reference logits of the official DiffRate timm patches (OpenGVLab/DiffRate), kept as a fixture.

The official code is not a dependency, so its logits were computed once and stored in
``fixtures/diffrate_official.safetensors`` (the cases in its metadata). To regenerate them, get the official code at
commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e outside this repository and point the script at it:

    git clone https://github.com/OpenGVLab/DiffRate /tmp/official/diffrate
    git -C /tmp/official/diffrate checkout 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e
    CUDA_VISIBLE_DEVICES= .venv/bin/python -m tests.diffrate_reference /tmp/official/diffrate

For every case it runs the official ``apply_patch`` (``DiffRate/patch/deit.py``, or ``DiffRate/patch/mae.py`` for
the cases with ``mae``) and ``set_kept_num(prune_kept, merge_kept)`` in eval mode, in fp32 on the CPU (TF32 off),
on a tiny timm ViT with a class token whose weights are a seeded init of our own (:func:`seeded_vit`). The official
code was written for timm 0.4.5; the shims, all here, are:

- only ``DiffRate/{ddp,merge,utils}.py`` and ``DiffRate/patch/{deit,mae}.py`` are imported: the packages
  ``DiffRate`` and ``DiffRate.patch`` are registered without running their ``__init__`` files, which import the
  visualisation code and the CAFormer patch with its model file;
- the official block adds the attention branch through ``self.drop_path``; timm 1.0's ``Block`` has
  ``drop_path1``/``drop_path2`` and layer scales ``ls1``/``ls2`` instead: each block gets ``drop_path``, an
  identity as in eval mode (the models have no layer scale, so ``ls1``/``ls2`` are identities too). The official
  attention (``self.attn(self.norm1(x), size, mask=...)``) reads ``qkv``, ``num_heads``, ``scale``, ``attn_drop``,
  ``proj`` and ``proj_drop``, which timm 1.0's ``Attention`` still has, and skips its qk-norm and output norm,
  identities here;
- the MAE cases are a :class:`MaeVisionTransformer`: timm 1.0's ViT with ``global_pool='avg'``, ``fc_norm=True`` and
  the ``forward`` of MAE's ``models_vit`` (timm 0.3), the head applied to ``forward_features``, which the MAE patch
  replaces by one ending in the size-weighted average of the patch tokens and ``fc_norm`` (timm 1.0's ``forward``
  passes arguments the patched ``forward_features`` does not take and would pool the pooled features again). The
  DeiT cases use timm 1.0's ``forward`` as it is (class-token readout);
- the patched ``forward`` returns ``(logits, flops)`` unless called with ``return_flop=False``, as here.
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

FIXTURE = Path(__file__).parent / "fixtures" / "diffrate_official.safetensors"
COMMIT = "91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e"
MODEL_FIELDS = ("depth", "embed_dim", "num_heads", "img_size", "patch_size")


def _case(model: tuple[int, ...], prune_kept: list[int], merge_kept: list[int], mae: bool = False) -> dict:
    """A case: the model's ``MODEL_FIELDS`` (MAE's pooling where ``mae``) and DiffRate's kept counts per block."""
    pooling = {"mae": True} if mae else {}
    return {
        **dict(zip(MODEL_FIELDS, model, strict=True)),
        **pooling,
        "prune_kept": prune_kept,
        "merge_kept": merge_kept,
    }


CASES = {  # name -> the case; the models' patch tokens are (img_size / patch_size) ** 2
    "d4-w48-t64-prune": _case((4, 48, 3, 32, 4), [65, 50, 41, 30], [65, 50, 41, 30]),
    "d5-w64-t64-merge": _case((5, 64, 4, 32, 4), [65, 65, 65, 65, 65], [65, 54, 44, 33, 21]),
    "d6-w96-t64-both": _case((6, 96, 6, 48, 6), [65, 60, 48, 40, 30, 20], [60, 52, 44, 34, 26, 3]),
    "d4-w72-t16-rising": _case((4, 72, 3, 32, 8), [17, 14, 16, 10], [17, 12, 15, 11]),
    "d5-w48-t49-above": _case((5, 48, 2, 28, 4), [50, 45, 60, 35, 30], [50, 40, 38, 36, 20]),
    "d6-w64-t64-mae": _case((6, 64, 4, 64, 8), [65, 58, 50, 41, 33, 24], [60, 50, 45, 36, 28, 3], mae=True),
    "d5-w80-t36-mae-rising": _case((5, 80, 5, 36, 6), [37, 30, 33, 20, 9], [37, 26, 27, 24, 5], mae=True),
}


class MaeVisionTransformer(VisionTransformer):
    """timm 1.0's ViT pooled as MAE's fine-tuned models are, with the ``forward`` of MAE's ``models_vit``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def seeded_vit(case: str, seed: int = 0) -> VisionTransformer:
    """The ViT of ``case`` (10 classes, class token; MAE's average pool and ``fc_norm`` where ``mae``) with weights
    from one seeded generator: weight matrices N(0, 1 / fan-in), class token and position embedding N(0, 0.5),
    norm scales N(1, 0.1), biases N(0, 0.02)."""
    spec = CASES[case]
    pooling = {"global_pool": "avg", "fc_norm": True} if spec.get("mae") else {}
    model = VisionTransformer(**{key: spec[key] for key in MODEL_FIELDS}, **pooling, num_classes=10).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1 and name not in ("cls_token", "pos_embed"):
                scale, offset = 1.0 / math.sqrt(param[0].numel()), 0.0
            elif param.ndim > 1:
                scale, offset = 0.5, 0.0
            else:  # a norm's scale (the only vectors called weight) or a bias
                scale, offset = (0.1, 1.0) if name.endswith(".weight") else (0.02, 0.0)
            param.copy_(offset + scale * noise)
    return model


def seeded_images(case: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    side = CASES[case]["img_size"]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def official_patches(root: Path) -> dict[str, types.ModuleType]:
    """The official ``DiffRate/patch/deit.py`` and ``mae.py`` of checkout ``root``, imported without the packages'
    ``__init__`` files."""
    for package, folder in (("DiffRate", root / "DiffRate"), ("DiffRate.patch", root / "DiffRate" / "patch")):
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]
        sys.modules[package] = module
    return {name: importlib.import_module(f"DiffRate.patch.{name}") for name in ("deit", "mae")}


def official_logits(patches: dict[str, types.ModuleType], case: str) -> torch.Tensor:
    spec = CASES[case]
    model = seeded_vit(case)
    if spec.get("mae"):
        model.__class__ = MaeVisionTransformer
    for block in model.blocks:
        assert isinstance(block.ls1, nn.Identity) and isinstance(block.attn.q_norm, nn.Identity)
        block.drop_path = nn.Identity()
    patches["mae" if spec.get("mae") else "deit"].apply_patch(model)
    model.set_kept_num(spec["prune_kept"], spec["merge_kept"])
    with torch.no_grad():
        logits = model(seeded_images(case), return_flop=False)
    assert torch.isfinite(logits).all(), case
    return logits.contiguous()


def main() -> None:
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    patches = official_patches(Path(sys.argv[1]))
    tensors = {case: official_logits(patches, case) for case in CASES}
    metadata = {"cases": json.dumps(CASES), "commit": COMMIT, "timm": timm.__version__, "torch": torch.__version__}
    save_file(tensors, FIXTURE, metadata=metadata)
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
