"""attnprune.compile: the inference modes give the eager model's logits, and share compiled blocks.

Dynamo's tracing runs here with the ``eager`` backend (seconds); Inductor's code generation takes minutes on this CPU,
so the Inductor test runs only with ``ATTNPRUNE_INDUCTOR_TESTS=1``. CUDA-graph modes are checked on CUDA by
``benchmarks/throughput.py`` (``benchmarks/gpu_session.sh``).
"""

import os

import pytest
import torch
from torch._dynamo.utils import counters

import attnprune
from attnprune import Routing, fused, prune
from attnprune.inference import MODES, InferenceModel
from tests.conftest import tiny_vit

SMALL = dict(embed_dim=32, num_heads=2, img_size=16)  # 16 patch tokens


@pytest.fixture
def small_images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_is_exported_and_checks_its_mode():
    assert attnprune.compile is attnprune.inference.compile
    with pytest.raises(ValueError, match="mode must be one of"):
        attnprune.compile(tiny_vit(**SMALL), mode="max-autotune")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("mode", ["cudagraph", "regional-cudagraph"])
def test_cuda_graph_modes_need_cuda(mode):
    with pytest.raises(RuntimeError, match="needs CUDA"):
        attnprune.compile(tiny_vit(**SMALL), mode=mode)


def test_cuda_graph_replay_refuses_cpu_inputs(small_images):
    model = InferenceModel(tiny_vit(**SMALL), "cudagraph")  # built directly: compile() would refuse first
    with pytest.raises(RuntimeError, match="runs on CUDA inputs"):
        model(small_images)


def test_default_mode_off_cuda_is_regional():
    assert attnprune.compile(tiny_vit(**SMALL), backend="eager").mode == "regional"


def test_eager_mode_is_the_model(small_images):
    model = prune(tiny_vit(**SMALL), Routing.tome(2, 4))
    with torch.no_grad():
        assert torch.equal(attnprune.compile(model, "eager")(small_images), model(small_images))


@pytest.mark.parametrize(
    "routing",
    [Routing(), Routing.tome(2, 4), Routing.evit(keep=0.7, layers=(1, 2)), Routing.topk_attention(0.8, (0, 3))],
    ids=["unpruned", "tome", "evit", "topk"],
)
def test_regional_equals_eager(routing, small_images):
    model = prune(tiny_vit(**SMALL), routing)
    with torch.no_grad():
        expected = model(small_images)
    compiled = attnprune.compile(model, "regional", backend="eager")
    torch.testing.assert_close(compiled(small_images), expected, rtol=1e-5, atol=1e-5)
    if routing.name.startswith("tome"):  # another batch size: recompiled
        torch.testing.assert_close(compiled(small_images[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def _graphs(routing: Routing, images: torch.Tensor) -> int:
    torch._dynamo.reset()
    counters.clear()
    attnprune.compile(prune(tiny_vit(depth=6, **SMALL), routing), "regional", backend="eager")(images)
    return counters["stats"]["unique_graphs"]


def test_regional_compiles_tome_into_as_many_graphs_as_the_unpruned_model(small_images):
    # ToMe merges in every block, each at its own token count: a whole-model compile compiles every block for its own
    # shapes; here all six share one graph (the token count is dynamic, the merge counted from r), as the unpruned
    # blocks do: embedding, block, head. EViT adds its fuse graph, once with fixed and once with dynamic counts.
    with fused.use_impl("fused"):  # the CUDA path
        unpruned = _graphs(Routing(), small_images)
        assert unpruned == 3
        assert _graphs(Routing.tome(1, 6), small_images) == unpruned
        assert _graphs(Routing.evit(keep=0.8, layers=(1, 3, 4)), small_images) <= unpruned + 2


def test_full_equals_eager(small_images):
    model = prune(tiny_vit(**SMALL), Routing.evit(keep=0.7, layers=(1, 2)))
    with torch.no_grad():
        expected = model(small_images)
    got = attnprune.compile(model, "full", backend="eager")(small_images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wrapper_shares_the_models_parameters_and_state_dict():
    model = tiny_vit(**SMALL)
    wrapped = attnprune.compile(model, "full", backend="eager")
    assert {k.removeprefix("model.") for k in wrapped.state_dict()} == set(model.state_dict())
    assert next(wrapped.parameters()) is next(model.parameters())


@pytest.mark.skipif(not os.environ.get("ATTNPRUNE_INDUCTOR_TESTS"), reason="Inductor on this CPU takes minutes")
@pytest.mark.parametrize("mode", [m for m in MODES if "cudagraph" not in m and m != "eager"])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_inductor_equals_eager(mode, impl, small_images):
    model = prune(tiny_vit(depth=2, **SMALL), Routing.tome(2, 2))
    with torch.no_grad():
        expected = model(small_images)
    with fused.use_impl(impl):
        got = attnprune.compile(model, mode)(small_images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
