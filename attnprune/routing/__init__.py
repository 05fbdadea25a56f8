"""Routings: the one contract of everything that prunes.

- :mod:`~attnprune.routing.rules`: a :class:`Rule` (one block's scorer, keep and reducer), validated field by field,
  and its :class:`LayerPlan` for a given input;
- :mod:`~attnprune.routing.core`: :class:`Routing`, the validated list of rules, its YAML form, the presets (ToMe,
  EViT, attention top-k, random, layer-wise) and :meth:`Routing.parse`, which reads a routing the same way for every
  entry point;
- :mod:`~attnprune.routing.baselines`: the presets tuned to a FLOPs budget (:func:`match_flops`,
  :func:`matched_baselines`). It counts FLOPs, so it sits above the engine and is not imported here.
"""

from attnprune.routing.core import PRESETS, Routing, baseline_layers
from attnprune.routing.rules import LayerPlan, Rule, max_merge

__all__ = ["PRESETS", "LayerPlan", "Routing", "Rule", "baseline_layers", "max_merge"]
