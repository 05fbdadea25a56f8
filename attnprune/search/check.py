"""The held-out check: the routing the search found against the baselines within budget, on validation images the
search never saw, returned only when its mean loss there is lower than every baseline's (or, at a confidence above
0.5, when a paired test says so)."""

from __future__ import annotations

import math
import numbers
import statistics
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from attnprune.errors import UserError
from attnprune.routing import Routing
from attnprune.routing.baselines import matched_baselines
from attnprune.search.evaluator import Evaluator

__all__ = [
    "split_holdout",
    "check_against_baselines",
    "check_held_out",
    "check_confidence",
    "decide",
    "retake",
    "standard_error",
]


def split_holdout(batches: list, holdout: float) -> tuple[list, list]:
    """The validation images searched on and the last ``holdout`` fraction of them kept out to check the result,
    as batches (a batch straddling the boundary is split)."""
    if not isinstance(holdout, numbers.Real) or isinstance(holdout, bool) or not 0 <= holdout < 1:
        raise UserError(f"holdout must be a fraction of the validation images in [0, 1), got {holdout!r}")
    total = sum(len(images) for images, _ in batches)
    count = round(holdout * total)
    if holdout > 0 and not 0 < count < total:
        raise UserError(
            f"holdout {holdout:g} of {total} validation images leaves {total - count} to search on and {count} to "
            "check on; it must leave at least one image for each"
        )
    searched, held_out, seen = [], [], 0
    for images, labels in batches:
        cut = min(max(total - count - seen, 0), len(images))
        seen += len(images)
        if cut:
            searched.append((images[:cut], labels[:cut] if labels is not None else None))
        if cut < len(images):
            held_out.append((images[cut:], labels[cut:] if labels is not None else None))
    return searched, held_out


def check_confidence(confidence: Any) -> None:
    """Refuse a confidence level of the paired test outside [0.5, 1)."""
    if not isinstance(confidence, numbers.Real) or isinstance(confidence, bool) or not 0.5 <= confidence < 1:
        raise UserError(f"search confidence must be in [0.5, 1), got {confidence!r}")


def check_held_out(
    model: VisionTransformer,
    evaluator: Evaluator,
    checker: Evaluator,
    routing: Routing,
    metrics: dict[str, float],
    target: float,
    confidence: float,
) -> tuple[Routing, dict[str, float], dict[str, Any]]:
    """:func:`check_against_baselines` on the held-out images of ``checker``, by the objective of the search's
    ``evaluator``.

    Returns:
        The routing returned, its metrics on the searched images (measured again when a baseline is returned) and
        the check. The check's work is added to ``evaluator``'s counts, its block passes scaled to the searched
        images.
    """
    routing, check = check_against_baselines(model, checker, routing, target, confidence)
    if check["returned"] != "searched":  # the returned baseline's metrics on the searched images
        metrics = evaluator.measure(evaluator.initial(), routing, 0)
    evaluator.candidates += checker.candidates
    evaluator.block_passes += checker.block_passes * checker.images / evaluator.images
    return routing, metrics, check


def check_against_baselines(
    model: VisionTransformer, held_out: Evaluator, routing: Routing, target: float, confidence: float = 0.5
) -> tuple[Routing, dict[str, Any]]:
    """The routing found against the baselines within budget (ToMe and PiToMe, and EViT, attention top-k and PPT where
    the model has a class token), measured on the held-out images by the search's objective.

    The routing found is returned only when it beats every baseline with ``confidence`` by a one-sided paired test of
    the per-image losses (the upper confidence bound of its mean loss minus the baseline's is below 0); otherwise
    the baseline with the lowest held-out loss is. A routing picked among hundreds of candidates looks better on the
    images it was picked on than it is, but not on held-out ones, so by default (0.5, where the bound is the mean
    difference) the contender with the lowest held-out loss is returned: on validation images neither the search nor
    the check saw, asking for 90% or 95% confidence returned ToMe where the routing found was better
    (``benchmarks/check_policy.py``).
    """
    check_confidence(confidence)
    calibration = held_out.first_images(256)  # PPT's variance threshold
    contenders = {"searched": routing, **matched_baselines(model, target, within=True, calibration=calibration)}
    contenders.pop("random", None)  # a control, not a contender (and absent when even it cannot meet the target)
    values = {method: held_out.per_image(held_out.initial(), r, 0) for method, r in contenders.items()}
    results = {method: {name: v.mean().item() for name, v in metrics.items()} for method, metrics in values.items()}
    z = statistics.NormalDist().inv_cdf(confidence)
    paired = {}
    for method in [m for m in contenders if m != "searched"]:
        difference = values["searched"]["loss"] - values[method]["loss"]
        mean, error = difference.mean().item(), standard_error(difference)
        paired[method] = {"difference": mean, "standard_error": error, "upper_bound": mean + z * error}
    method = decide(paired, {m: r["loss"] for m, r in results.items()}, confidence)
    check = {
        "holdout_images": held_out.images,
        "objective": held_out.objective,
        "confidence": confidence,
        "holdout": results,
        "paired": paired,
        "returned": method,
        "searched_routing": routing.to_dict(),
    }
    if method != "searched":
        bound = paired[method]["upper_bound"]
        check["note"] = (
            f"the routing the search found did not beat the baseline {method} on the {held_out.images} held-out "
            f"images with {confidence:.0%} confidence ({held_out.objective} {results['searched']['loss']:.4g} "
            f"against {results[method]['loss']:.4g}, upper bound of the difference {bound:+.3g}), so {method} is "
            "returned; the routing found is in searched_routing"
        )
    return contenders[method], check


def decide(paired: dict[str, dict[str, float]], losses: dict[str, float], confidence: float) -> str:
    """What the held-out check returns at ``confidence``: ``"searched"`` when the upper bound ``difference + z *
    standard_error`` of the routing found against every baseline in ``paired`` is below 0 (also when ``paired`` is
    empty), otherwise the baseline with the lowest held-out ``losses``. A stored ``report["check"]`` holds both, so
    its decision can be retaken at another confidence."""
    z = statistics.NormalDist().inv_cdf(confidence)
    if all(p["difference"] + z * p["standard_error"] < 0 for p in paired.values()):
        return "searched"
    return min(paired, key=losses.__getitem__)


def retake(check: dict[str, Any], confidence: float) -> str:
    """:func:`decide` on a stored ``report["check"]``: what it returns at ``confidence``."""
    return decide(check["paired"], {m: values["loss"] for m, values in check["holdout"].items()}, confidence)


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of ``values`` (per-image differences for a paired comparison); infinite for one
    value, which says nothing of the spread (so a routing cannot be confirmed on one image)."""
    return values.std().item() / math.sqrt(len(values)) if len(values) > 1 else math.inf
