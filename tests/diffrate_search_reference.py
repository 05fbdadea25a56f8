"""Reference rates of the official DiffRate search (OpenGVLab/DiffRate), kept as a fixture.

The official code is not a dependency, so its learned rate logits and kept counts were computed once and stored in
``fixtures/diffrate_search_official.json``. To regenerate them, get the official code at commit
91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e outside this repository and point the script at it:

    git clone https://github.com/OpenGVLab/DiffRate /tmp/official/diffrate
    git -C /tmp/official/diffrate checkout 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e
    CUDA_VISIBLE_DEVICES= .venv/bin/python -m tests.diffrate_search_reference /tmp/official/diffrate

Each case runs the official search on a tiny ViT with weights of our own seeded init (:func:`seeded_vit`) and
seeded images, on the CPU in fp32: ``DiffRate/patch/deit.py``'s ``apply_patch`` with the case's granularity for
pruning and merging, the model in training mode, AdamW on its ``arch_parameters`` (``--arch-lr 0.01``, no weight
decay) with timm's ``CosineLRScheduler`` to ``--arch-min-lr 0.001`` over the steps, stepped once per step (the
official ``main.py`` steps it once per epoch), every step on all the case's images. The loss is ``engine.py``'s,
task loss plus ``5 * (flops - target) ** 2``, with the FLOPs in our units: the official ``flops / 1e9`` becomes
``4.6 * flops / F_unpruned`` (see :mod:`attnprune.search.diffrate`), and the constant by which the official count
differs from ours (it embeds the class token too, and counts 3 input channels) is taken off; the case ``literal``
keeps the official ``flops / 1e9`` and gives our search the weight that makes its penalty the same. The task loss
is cross-entropy against labels (the unpruned model's predictions) or, for the ``kl`` cases, the KL divergence from
the unpruned model's class distribution. The shims for timm 1.0: the official packages are registered without their
``__init__`` files (which import the visualisation and CAFormer code), and each block gets the ``drop_path`` of timm
0.4.5 as an identity (the models have no drop path, layer scale or qk-norm).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import sys
import types
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler
from torch import nn

FIXTURE = Path(__file__).parent / "fixtures" / "diffrate_search_official.json"
COMMIT = "91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e"
CASES = {  # name -> the model's fields, the search's settings
    "kl-g4": {"depth": 4, "embed_dim": 32, "objective": "kl", "granularity": 4, "budget": 0.6, "steps": 40},
    "top1-g8": {"depth": 5, "embed_dim": 32, "objective": "top1", "granularity": 8, "budget": 0.5, "steps": 40},
    "literal": {"depth": 4, "embed_dim": 48, "objective": "top1", "granularity": 4, "budget": 0.7, "steps": 40},
}
IMAGES = 32


def seeded_vit(case: str) -> VisionTransformer:
    """The case's ViT (32 px, patch 4: 64 patch tokens; 3 heads of 16 channels; 10 classes) with every weight drawn
    from one seeded generator: N(0, 1 / fan-in) for matrices, N(0, 0.5) for the class token and position embedding,
    N(1, 0.1) for norm scales and N(0, 0.02) for biases."""
    spec = CASES[case]
    model = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=spec["embed_dim"], depth=spec["depth"], num_heads=spec["embed_dim"] // 16
    )
    generator = torch.Generator().manual_seed(len(case))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in ("cls_token", "pos_embed"):
                std, mean = 0.5, 0.0
            elif param.ndim > 1:
                std, mean = 1 / math.sqrt(param[0].numel()), 0.0
            else:
                std, mean = (0.1, 1.0) if name.endswith(".weight") else (0.02, 0.0)
            param.copy_(mean + std * torch.randn(param.shape, generator=generator))
    return model.eval()


def seeded_data(model: VisionTransformer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images, the labels (the unpruned model's predictions) and the unpruned model's logits."""
    images = torch.randn(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(images)
    return images, reference.argmax(-1), reference


def flops_units(model: VisionTransformer, unpruned: int) -> tuple[float, float]:
    """The official training-time count less ours (a constant), and our FLOPs weight for the ``literal`` case."""
    embed = model.patch_embed
    offset = (embed.num_patches + 1) * model.embed_dim * embed.patch_size[0] ** 2 * 3
    return offset - embed.num_patches * embed.proj.weight.numel(), 5.0 * (unpruned / 4.6e9) ** 2


def official_search(root: Path, case: str) -> dict:
    from attnprune import count_flops
    from attnprune.fidelity import kl_divergence

    for package in ("DiffRate", "DiffRate.patch"):
        module = types.ModuleType(package)
        module.__path__ = [str(root.joinpath(*package.split(".")))]
        sys.modules[package] = module
    deit = importlib.import_module("DiffRate.patch.deit")
    spec, model = CASES[case], seeded_vit(case)
    images, labels, reference = seeded_data(model)
    unpruned = count_flops(model)
    offset, _ = flops_units(model, unpruned)
    patched = copy.deepcopy(model)
    for block in patched.blocks:
        block.drop_path = nn.Identity()
    deit.apply_patch(patched, prune_granularity=spec["granularity"], merge_granularity=spec["granularity"])
    patched.train()
    optimizer = torch.optim.AdamW(patched.arch_parameters(), lr=0.01, weight_decay=0)
    scheduler = CosineLRScheduler(optimizer, t_initial=spec["steps"], lr_min=0.001)
    for step in range(spec["steps"]):
        scheduler.step(step)
        outputs, flops = patched(images)
        if spec["objective"] == "kl":
            task = kl_divergence(reference, outputs).mean()
        else:
            task = F.cross_entropy(outputs, labels)
        if case == "literal":  # engine.py's penalty as it is, the target in its GFLOPs
            penalty = 5 * (flops / 1e9 - (spec["budget"] * unpruned + offset) / 1e9) ** 2
        else:
            penalty = 5 * (4.6 * (flops - offset - spec["budget"] * unpruned) / unpruned) ** 2
        optimizer.zero_grad()
        (task + penalty).backward()
        optimizer.step()
    for block in patched.blocks:  # the counts of the last logits (a forward sets them from the logits it ran with)
        block.prune_ddp.update_kept_token_number(), block.merge_ddp.update_kept_token_number()
    prune_kept, merge_kept = patched.get_kept_num()
    blocks = patched.blocks[1:]
    logits = [[b.prune_ddp.selected_probability.tolist(), b.merge_ddp.selected_probability.tolist()] for b in blocks]
    return {"prune_kept": prune_kept, "merge_kept": merge_kept, "logits": logits}


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    root = Path(sys.argv[1])
    results = {case: {**spec, **official_search(root, case)} for case, spec in CASES.items()}
    meta = {"commit": COMMIT, "timm": timm.__version__, "torch": torch.__version__, "images": IMAGES}
    FIXTURE.write_text(json.dumps({"meta": meta, "cases": results}, indent=1) + "\n")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
