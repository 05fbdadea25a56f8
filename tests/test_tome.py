"""Our ToMe (``Routing.tome``) against the official facebookresearch/ToMe timm patch."""

import pytest
import torch
from safetensors.torch import load_file

from attnprune import Routing, prune
from attnprune.vit import num_patch_tokens
from tests.tome_reference import CASES, FIXTURE, seeded_images, seeded_model


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_official_implementation(name):
    reference = load_file(FIXTURE)[name]
    model = seeded_model(name)
    with torch.no_grad():
        unpruned = model(seeded_images())
        tokens = num_patch_tokens(model)  # the official code caps r where matching cannot merge that many
        ours = prune(model, Routing.tome(CASES[name], len(model.blocks), num_tokens=tokens))(seeded_images())
    assert (unpruned - reference).abs().max() > 1e-2  # the fixture is not trivially the unpruned model
    assert (ours - reference).abs().max() <= 1e-4


def test_r_zero_is_no_pruning(images):
    from tests.conftest import tiny_vit

    model = tiny_vit()
    with torch.no_grad():
        reference = model(images)
        assert torch.equal(prune(model, Routing.tome(0, 4))(images), reference)
