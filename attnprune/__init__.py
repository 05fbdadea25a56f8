"""attnprune: per-layer static token pruning for timm Vision Transformers (and the transformers and open_clip ViTs
:func:`convert` makes timm ViTs)."""

from attnprune.adapters import convert
from attnprune.flops import count_flops
from attnprune.inference import compile
from attnprune.io import load_model, save_model
from attnprune.paradigms import PARADIGMS
from attnprune.reduction import REDUCERS
from attnprune.routing import LayerPlan, Routing, Rule
from attnprune.routing.baselines import match_flops
from attnprune.scoring import SCORERS
from attnprune.vit import prune, unprune

__all__ = [
    "PARADIGMS",
    "REDUCERS",
    "SCORERS",
    "LayerPlan",
    "Routing",
    "Rule",
    "compile",
    "convert",
    "count_flops",
    "load_model",
    "match_flops",
    "prune",
    "save_model",
    "unprune",
]
__version__ = "0.1.0"
