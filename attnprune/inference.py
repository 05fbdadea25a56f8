"""Inference modes for pruned (or unpruned) timm ViTs: CUDA-graph capture and regional compilation.

A static routing makes every pruned forward a fixed sequence of shapes for a given input shape, so the whole forward
can be captured once as a CUDA graph and replayed (no Python, no launch overhead), and each block can be compiled.
:func:`compile` wraps a model in one of :data:`MODES`:

- ``eager``: the model as it is.
- ``cudagraph``: the eager forward captured as one CUDA graph per input shape (static input buffer, replay). CUDA only.
- ``regional``: the embedding, every block and the head compiled separately with ``torch.compile``. The token
  dimension is marked dynamic, so blocks that differ only in their number of tokens (all of ToMe's, or the unpruned
  blocks between EViT's pruning layers) share one compiled graph: compile time stays near the unpruned model's,
  where compiling the whole pruned model compiles every block again for its own shapes.
- ``regional-cudagraph``: ``regional``, then captured as a CUDA graph per input shape (fused kernels, no launch
  overhead: the mode for latency). CUDA only.
- ``full``: ``torch.compile`` of the whole forward.

The wrapper is for inference: it runs without gradients, in eval mode, and shares the model's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnprune.errors import UserError
from attnprune.reduction import REDUCERS
from attnprune.routing import LayerPlan, Routing
from attnprune.vit import embed, head, plans_for, pruned_block_forward, routing_of, run_blocks, runs_as_timm

__all__ = ["MODES", "InferenceModel", "compile"]

MODES = ("eager", "cudagraph", "regional", "regional-cudagraph", "full")
RECOMPILE_LIMIT = 64


def compile(model: nn.Module, mode: str | None = None, **compile_kwargs) -> InferenceModel:  # noqa: A001
    """Wrap a timm ViT, pruned by :func:`attnprune.prune` or not, for fast inference.

    Args:
        model: the model (its routing, if any, is read at every call, so prune before or after alike).
        mode: one of :data:`MODES`; by default ``regional-cudagraph`` for a model on a CUDA device, else
            ``regional``.
        compile_kwargs: passed to ``torch.compile`` (``regional``, ``regional-cudagraph``, ``full``), for example
            ``options`` or ``backend``.

    Returns:
        An ``nn.Module`` whose forward maps images to the model's output.

    Raises:
        UserError: an unknown mode.
        RuntimeError: a CUDA-graph mode without CUDA or with a model that is not on a CUDA device.

    Example:
        >>> import attnprune, torch
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
        >>> model = attnprune.prune(model.eval(), "tome:r=8")
        >>> fast = attnprune.compile(model, "regional", backend="eager")  # without backend: Inductor
        >>> fast(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if mode is None:
        mode = "regional-cudagraph" if next(model.parameters()).device.type == "cuda" else "regional"
    if mode not in MODES:
        raise UserError(f"attnprune.compile: mode must be one of {MODES}, got {mode!r}")
    if mode.endswith("cudagraph"):
        _check_cuda(model, mode)
    return InferenceModel(model, mode, **compile_kwargs)


def _check_cuda(model: nn.Module, mode: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"attnprune.compile: mode {mode!r} captures CUDA graphs and needs CUDA, which is unavailable"
        )
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"attnprune.compile: mode {mode!r} needs the model on a CUDA device, it is on {device}")


class InferenceModel(nn.Module):
    """A model run in one of :data:`MODES` (see :func:`compile`)."""

    def __init__(self, model: nn.Module, mode: str = "regional", **compile_kwargs) -> None:
        super().__init__()
        self.model, self.mode = model.eval(), mode
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._pool = None
        # compiled callables in a plain dict, not as submodules: the state_dict stays the model's
        self._compiled: dict[str, object] = {}
        if mode == "full":
            self._compiled["full"] = torch.compile(model, **compile_kwargs)
        if mode.startswith("regional"):
            # every block, of every routing compiled in this process, goes through the same two functions: allow
            # more than the default 8 variants of each (token counts, plans, batch sizes) before Dynamo gives up
            _raise_recompile_limit(RECOMPILE_LIMIT)
            for name, fn in (
                ("embed", embed),
                ("block", _plain_block),
                ("pruned", pruned_block_forward),
                ("tail", _tail),
            ):
                self._compiled[name] = torch.compile(fn, **compile_kwargs)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self.mode.endswith("cudagraph"):
            return self._replay(images)
        return self._run(images)

    def _run(self, images: Tensor) -> Tensor:
        if self.mode in ("eager", "cudagraph"):
            return self.model(images)
        if self.mode == "full":
            return self._compiled["full"](images)
        return self._regional(images)

    def _regional(self, images: Tensor) -> Tensor:
        model = self.model
        x = self._compiled["embed"](model, images)
        plans = plans_for(model, x.shape[1] - model.num_prefix_tokens)
        x, size = run_blocks(model, x, None, routing_of(model, None), plans, step=self._compiled_step)
        return self._compiled["tail"](model, x, size)

    def _compiled_step(
        self,
        block: nn.Module,
        x: Tensor,
        size: Tensor | None,
        plan: LayerPlan | None,
        routing: Routing,
        num_prefix: int,
        layer: int,
        source: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """:func:`attnprune.vit.block_step` through the compiled block functions."""
        if plan is not None and size is None and REDUCERS[plan.rule.reduce].averages:
            # sizes of one (a zero attention bias) instead of None: the first averaging block then runs the same
            # compiled graph as the later ones
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        _mark_tokens_dynamic(x, size)
        if runs_as_timm(plan, size, routing):
            return self._compiled["block"](block, x), size, source
        # the layer index only seeds the random scorer: a constant elsewhere lets every block share a graph
        layer = layer if plan is not None and plan.rule.score == "random" else 0
        return self._compiled["pruned"](block, x, size, plan, routing, num_prefix, layer, source)

    def clear_graphs(self) -> None:
        """Drop the captured CUDA graphs (and the memory they hold); the next call captures again."""
        self._graphs.clear()
        self._pool = None

    def _replay(self, images: Tensor) -> Tensor:
        if images.device.type != "cuda":
            raise RuntimeError(f"attnprune.compile: mode {self.mode!r} runs on CUDA inputs, got a {images.device} one")
        key = (tuple(images.shape), images.dtype, images.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(images)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(images)
        graph.replay()
        return static_out.clone()

    def _capture(self, images: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        """Warm up on a side stream (compilation, allocator, cuBLAS workspaces), then capture one forward."""
        static_in = images.clone()
        stream = torch.cuda.Stream(images.device)
        stream.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._run(static_in)
        torch.cuda.current_stream(images.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._run(static_in)
        return graph, static_in, static_out


def _raise_recompile_limit(limit: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the name before 2.7
    setattr(config, name, max(getattr(config, name), limit))


def _plain_block(block: nn.Module, x: Tensor) -> Tensor:
    return block(x)


def _tail(model: nn.Module, x: Tensor, size: Tensor | None) -> Tensor:
    return head(model, model.norm(x), size)


def _mark_tokens_dynamic(x: Tensor, size: Tensor | None) -> None:
    """Let one compiled block serve every token count (no-op outside ``torch.compile``'s tracing)."""
    torch._dynamo.maybe_mark_dynamic(x, 1)
    if size is not None:
        torch._dynamo.maybe_mark_dynamic(size, 1)
