"""Lean reducers for CUDA (not the default: see :func:`set_impl`), and the one dispatch point between them and the
reference in :mod:`attnprune.reduction`.

The reference reducers are the readable definition and the CPU path. The lean ones compute the same tokens and sizes
with fewer kernels and fewer passes over ``[B, T, C]``, the cost that dominates a pruned forward in bfloat16 on a GPU:

- ``drop``: one gather with the prefix folded into the index, instead of slice, gather and concatenate, for the
  tokens and again for the sizes.
- ``fuse`` (EViT): the fused token is one batched matrix product of the score-times-size weights (zero on the kept
  tokens) with all tokens, instead of gathering, weighting and summing the dropped tokens.
- ``merge`` (ToMe): tokens and sizes travel as one tensor (the size is an extra channel), so the size-weighted merge
  is one gather of the unmerged tokens in output order, one gather of the sources and ONE in-place scatter-add,
  instead of two full merges (tokens, then sizes) of three gathers, a scatter and a concatenation each.
- proportional attention (:func:`attention_with_bias`): the ``log(size)`` bias rides on an extra query/key channel,
  so ``scaled_dot_product_attention`` can pick its flash kernels (which take no mask) on CUDA.

Every formulation is written so that ``torch.compile`` fuses its pointwise parts into the gathers. The tests check
each against the reference on the CPU (``use_impl("fused")``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from attnprune import reduction
from attnprune.errors import UserError
from attnprune.reduction import bipartite_match, prefix_split
from attnprune.reduction.registry import ReduceFn

__all__ = [
    "FUSED_REDUCERS",
    "IMPLS",
    "attention_with_bias",
    "get_impl",
    "lean",
    "lean_attention",
    "reducer_for",
    "set_impl",
    "use_impl",
]

IMPLS = ("auto", "reference", "fused")
_impl = "auto"


def set_impl(impl: str) -> None:
    """Choose the reducers: ``auto`` (today the reference everywhere), ``reference`` or ``fused`` everywhere.

    ``auto`` is the path measured fastest. On one H200 in bfloat16 under CUDA graphs, at batch 1024, the lean path's
    efficiency (speed-up over the FLOPs reduction) was 0.57 for ToMe on ViT-B against the reference's 0.67, 0.74
    against 0.83 for the layer-wise routing and 0.85 against 0.84 for EViT (``benchmarks/throughput.py --summarize
    benchmarks/results/throughput_gpu_first_run.json``, its ``auto`` rows then the lean path, and the same with
    ``--impl reference``), so ``auto`` takes the reference until a lean variant measures faster.
    """
    global _impl
    if impl not in IMPLS:
        raise UserError(f"reduction impl must be one of {IMPLS}, got {impl!r}")
    _impl = impl


def get_impl() -> str:
    """The implementation chosen by :func:`set_impl` (``auto`` by default)."""
    return _impl


@contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Run a block of code with the reducers of ``impl`` (see :func:`set_impl`), then restore the previous choice."""
    previous = _impl
    set_impl(impl)
    try:
        yield
    finally:
        set_impl(previous)


def lean() -> bool:
    """Whether the lean path runs under the current choice (see :func:`set_impl`)."""
    return _impl == "fused"


def lean_attention(q: Tensor) -> bool:
    """Whether proportional attention takes :func:`attention_with_bias`: on the lean path, except for float32 on CUDA
    (flash kernels take half precision only, so there the masked kernel is the faster one)."""
    return lean() and not (q.device.type == "cuda" and q.dtype == torch.float32)


def reducer_for(name: str) -> ReduceFn:
    """The reducer registered as ``name``: the lean version where :func:`lean` says so and one exists, else the
    reference."""
    return FUSED_REDUCERS[name] if lean() and name in FUSED_REDUCERS else reduction.REDUCERS[name]


def _gather(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _with_prefix(index: Tensor, num_prefix: int, offset: int) -> Tensor:
    """``[prefix positions, index + offset]``: one index over the whole sequence, prefix first."""
    prefix = torch.arange(num_prefix, device=index.device, dtype=index.dtype).expand(len(index), -1)
    return torch.cat([prefix, index + offset], dim=1)


def drop(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, scores: Tensor, **_: object):
    """:func:`attnprune.reduction.drop` with one gather for the prefix and the kept tokens."""
    keep = scores.topk(n_out, dim=1, sorted=False).indices.sort(dim=1).values
    index = _with_prefix(keep, num_prefix, num_prefix)
    return _gather(x, index), None if size is None else _gather(size, index)


def fuse(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, scores: Tensor, **_: object):
    """:func:`attnprune.reduction.fuse` with the fused token as one matrix product over all tokens."""
    n_keep = n_out - 1
    order = scores.argsort(dim=1, descending=True)  # as the reference: the same tokens kept under ties
    keep = order[:, :n_keep].sort(dim=1).values
    patch_size = size[:, num_prefix:, 0] if size is not None else torch.ones_like(scores)
    dropped = torch.ones_like(scores).scatter(1, keep, 0.0)
    weights = (scores * patch_size * dropped).to(x.dtype)
    total = weights.sum(dim=1)[:, None, None].clamp_min(torch.finfo(x.dtype).tiny)
    fused = (weights[:, None, :] @ x[:, num_prefix:]) / total
    index = _with_prefix(keep, num_prefix, num_prefix)
    rest_size = (patch_size * dropped).sum(dim=1)[:, None, None]
    kept_size = _gather(size, index) if size is not None else x.new_ones(len(x), index.shape[1], 1)
    x = torch.cat([_gather(x, index), fused], dim=1)
    return x, torch.cat([kept_size, rest_size.to(kept_size.dtype)], dim=1)


def merge(x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, *, metric: Tensor, **_: object):
    """:func:`attnprune.reduction.merge` with tokens and sizes merged together: one scatter instead of two."""
    batch, tokens, width = x.shape
    r = tokens - num_prefix - n_out
    prefix_a, prefix_b = prefix_split(num_prefix)
    unmerged, sources, destinations = bipartite_match(metric, r, num_prefix)
    # size as an extra channel, padded so that rows stay 16-byte aligned for vectorised gathers
    pad = -(width + 1) % 8
    ones = size is None
    size = torch.ones_like(x[..., :1]) if ones else size
    parts = [x if ones else x * size, size] + ([x.new_zeros(batch, tokens, pad)] if pad else [])
    xs = torch.cat(parts, dim=-1)
    kept_a = unmerged[:, prefix_a:] * 2
    set_b = torch.arange(2 * prefix_b + 1, tokens, 2, device=x.device).expand(batch, -1)
    out = _gather(xs, torch.cat([_with_prefix(kept_a, num_prefix, 0), set_b], dim=1))
    first_b = num_prefix + kept_a.shape[1]  # output position of B token ``prefix_b``
    target = (destinations - prefix_b + first_b)[..., None].expand(-1, -1, xs.shape[-1])
    out = out.scatter_add_(1, target, _gather(xs, sources * 2))
    merged_size = out[..., width : width + 1].contiguous()  # the layout of the reference's sizes
    return out[..., :width] / merged_size, merged_size


FUSED_REDUCERS: dict[str, ReduceFn] = {"drop": drop, "fuse": fuse, "merge": merge}


def attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """``scaled_dot_product_attention`` with a per-key logit bias ``[B, 1, 1, T]`` and no mask argument.

    ``q . k * scale + bias`` equals ``[q, 1/scale] . [k, bias] * scale``: the bias becomes one more channel of the
    queries and keys (padded to a multiple of 8 with zeros, values too), which lets CUDA use its flash kernels.
    """
    head_dim = q.shape[-1]
    pad = 8 - head_dim % 8
    zeros = q.new_zeros(*q.shape[:-1], pad - 1)
    bias = bias.to(k.dtype).reshape(len(k), 1, -1, 1).expand(-1, k.shape[1], -1, -1)
    q = torch.cat([q, torch.full_like(q[..., :1], 1.0 / scale), zeros], dim=-1)
    k = torch.cat([k, bias, k.new_zeros(*k.shape[:-1], pad - 1)], dim=-1)
    v = F.pad(v, (0, pad))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)[..., :head_dim]
