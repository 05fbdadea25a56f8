"""Search the static routing that best preserves a model under a FLOPs budget, on validation images.

The package, stage by stage:

- :mod:`~attnprune.search.space`: the candidate rules (:class:`SearchSpace`, as :class:`~attnprune.routing.Rule` s)
  and the ToMe completion of a partial routing, so every candidate is a complete routing within budget;
- :mod:`~attnprune.search.objective`: what ranks candidates, by default fidelity to the unpruned model on the same
  images (KL divergence of the class distributions; cosine distance of the features for a headless backbone), which
  needs no labels and varies far less between image subsets than top-1;
- :mod:`~attnprune.search.evaluator`: scores routings from cached token states of the prefix already fixed;
- :mod:`~attnprune.search.state`: the resumable :class:`~attnprune.search.state.SearchState` (the best routing so
  far, the beam, the work done; JSON on disk, tied to the settings, every weight and the searched images);
- :mod:`~attnprune.search.strategy`: the one signature of a strategy, ``strategy(context, state)``, and what the
  :class:`~attnprune.search.strategy.SearchContext` holds;
- :mod:`~attnprune.search.beam`, :mod:`~attnprune.search.transition`, :mod:`~attnprune.search.label_free`,
  :mod:`~attnprune.search.diffrate`: the strategies, registered by name in :data:`~attnprune.search.core.STRATEGIES`
  (``diffrate`` is DiffRate's differentiable rate search, its relaxed block forward in
  :mod:`~attnprune.search.relaxation`);
- :mod:`~attnprune.search.check`: the held-out check of the routing found against the baselines within budget;
- :mod:`~attnprune.search.distributed`: the data-parallel search under ``torch.distributed`` (each rank a share of
  the images, the ranks' per-image values gathered in image order, one decision on every rank);
- :mod:`~attnprune.search.core`: :func:`search_routing` (validate, run, check, report), which by default keeps 30%
  of the images out of the search and returns the best, on those, of the routing found and the baselines.
"""

from attnprune.search.check import check_against_baselines, split_holdout
from attnprune.search.core import SearchResult, search_routing
from attnprune.search.evaluator import Evaluator
from attnprune.search.objective import OBJECTIVES, cosine_distance, kl_divergence
from attnprune.search.space import InfeasibleBudget, SearchSpace, cheapest_flops
from attnprune.search.strategy import RateOptions

__all__ = [
    "OBJECTIVES",
    "Evaluator",
    "InfeasibleBudget",
    "RateOptions",
    "SearchResult",
    "SearchSpace",
    "check_against_baselines",
    "cheapest_flops",
    "cosine_distance",
    "kl_divergence",
    "search_routing",
    "split_holdout",
]
