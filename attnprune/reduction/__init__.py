"""Reducers: how a block removes tokens, each a pure function on ``[B, T, C]`` tokens registered by name.

- :mod:`~attnprune.reduction.pruning`: ``drop`` (keep the top-scoring tokens) and ``fuse`` (EViT: also average the
  dropped ones into one token);
- :mod:`~attnprune.reduction.tome`: ``merge`` (ToMe's bipartite soft matching);
- the peers' reducers, one module per method: :mod:`~attnprune.reduction.diffrate`, :mod:`~attnprune.reduction.ppt`,
  :mod:`~attnprune.reduction.pitome`, :mod:`~attnprune.reduction.mctf`;
- :mod:`~attnprune.reduction.registry`: the :class:`Reducer` records and :data:`REDUCERS`.

The lean CUDA versions of the reducers live in :mod:`attnprune.fused`, behind one dispatch point.
"""

from attnprune.reduction import diffrate, mctf, pitome, ppt, pruning, tome  # noqa: F401  (they register)
from attnprune.reduction.pruning import drop, fuse
from attnprune.reduction.registry import REDUCERS, Reducer, gather_tokens, register_reducer
from attnprune.reduction.tome import bipartite_match, bipartite_merge_plan, merge, prefix_split

__all__ = [
    "REDUCERS",
    "Reducer",
    "bipartite_match",
    "bipartite_merge_plan",
    "drop",
    "fuse",
    "gather_tokens",
    "merge",
    "prefix_split",
    "register_reducer",
]
