"""The reducer registry: how a block removes tokens, looked up by name from a routing rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["REDUCERS", "Reducer", "gather_tokens", "register_reducer"]

ReduceFn = Callable[..., tuple[Tensor, Tensor | None]]
FlopsFn = Callable[[Any, int, int, int], int]


def _no_flops(plan: Any, tokens: int, dim: int, head_dim: int) -> int:
    return 0


@dataclass(frozen=True)
class Reducer:
    """A registered reducer.

    Attributes:
        name: registry key, as routing rules write it.
        fn: ``fn(x, size, n_out, num_prefix, *, scores, metric, **options) -> (x, size)`` on ``x: [B, T, C]`` with
            ``num_prefix`` prefix tokens at the front (never removed, kept at the front) and ``size`` ``[B, T, 1]``
            (None: all ones), the number of input patches each token stands for.
        takes_score: the rule names a scorer whose scores rank the tokens (``drop``, ``fuse``); otherwise the rule
            takes none (``merge`` matches on keys).
        metric: what the reducer matches tokens on: ``keys`` (the attention keys averaged over heads, ToMe's),
            ``tokens`` (the block's hidden state after attention) or None.
        options: rule fields the reducer reads besides the counts (for example ``threshold``), passed to ``fn``
            by name; ``required`` of them must be given.
        required: the options a rule must give.
        max_removed: the most tokens it can remove from ``n`` non-prefix tokens (bipartite matching: half); None:
            all but one.
        added: tokens it appends (EViT's fused token).
        averages: it averages tokens together, so token sizes matter from then on.
        lookahead: it runs on the block's input, before attention (MCTF's): ``fn`` also takes ``attention``, the
            block's attention probabilities ``[B, H, T, T]`` on ``x``, and returns ``(x, size, attention)`` with the
            probabilities merged as the tokens were; the block applies them to the values of the merged tokens.
        flops: ``flops(plan, tokens, dim, head_dim)``: its own multiply-accumulates per image on ``tokens`` tokens
            (prefix included) of width ``dim``, given the rule's resolved ``LayerPlan``.
    """

    name: str
    fn: ReduceFn
    takes_score: bool = False
    metric: str | None = None
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    max_removed: Callable[[int], int] | None = None
    added: int = 0
    averages: bool = False
    lookahead: bool = False
    flops: FlopsFn = _no_flops

    def __call__(self, x: Tensor, size: Tensor | None, n_out: int, num_prefix: int, **kwargs: Any):
        return self.fn(x, size, n_out, num_prefix, **kwargs)


REDUCERS: dict[str, Reducer] = {}


def register_reducer(name: str, **spec: Any) -> Callable[[ReduceFn], ReduceFn]:
    """Decorator adding a reducing function to :data:`REDUCERS` under ``name`` with the fields of :class:`Reducer`."""

    def wrap(fn: ReduceFn) -> ReduceFn:
        if name in REDUCERS:
            raise ValueError(f"reducer {name!r} is registered twice")
        REDUCERS[name] = Reducer(name, fn, **spec)
        return fn

    return wrap


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, i]]`` along the token dimension: ``[B, T, C], [B, K] -> [B, K, C]``."""
    return x.gather(dim=1, index=idx[..., None].expand(-1, -1, x.shape[-1]))
