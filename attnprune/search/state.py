"""The resumable state of a search: what the strategies change as they go, saved atomically after every step as
JSON, refused by any other search."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnprune.atomic import write_text_atomic
from attnprune.errors import UserError
from attnprune.routing import Routing, Rule
from attnprune.routing.rules import check_rule
from attnprune.search.evaluator import Evaluator

__all__ = ["Best", "BeforeFill", "SearchState", "difference", "fingerprint"]


def fingerprint(
    model: nn.Module, settings: dict[str, Any], batches: list[tuple[Tensor, Tensor | None]]
) -> tuple[str, dict[str, Any]]:
    """Identifies a search: its settings, every weight of the model and the searched images and labels (all of them,
    as every rank reads them), so that a state saved for another model (even one differing only in its head) or other
    data is never resumed, and one saved at any world size is.

    Returns:
        The fingerprint, and its parts by name (``settings``, ``model``, ``images``, ``image_count``) for a state to
        record, so that a state of another search is refused naming what differs.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    parts = {"model": hashlib.sha256(), "images": hashlib.sha256()}
    images = [x for x, _ in batches]
    tensors = [("model", t) for t in model.state_dict().values()] + [("images", x) for x in images]
    tensors += [("images", y) for _, y in batches if y is not None]
    for part, tensor in tensors:
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        digest.update(data)
        parts[part].update(data)
    identity = {
        "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
        **{part: hashed.hexdigest()[:16] for part, hashed in parts.items()},
        "image_count": sum(len(x) for x in images),
    }
    return digest.hexdigest()[:16], identity


def difference(saved: Any, identity: dict[str, Any] | None) -> str:
    """What differs between the search a state was saved by (its ``identity``, None in a state saved before states
    recorded one) and this search's ``identity``, in words."""
    if not isinstance(saved, dict) or identity is None:
        return "model, data, budget or settings differ"
    old, new = saved.get("settings", {}), identity["settings"]
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if before != now and isinstance(before, dict) and isinstance(now, dict):
            field = next(k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
            key, before, now = f"{key}.{field}", before.get(field), now.get(field)
        if before != now:
            return f"it was searched with {key} {before!r}, this search has {now!r}"
    if saved.get("images") != identity["images"]:
        return (
            f"it searched other images or labels ({saved.get('image_count')} images, fingerprint "
            f"{saved.get('images')}; this search: {identity['image_count']}, {identity['images']})"
        )
    return "it searched another model (the weights differ)"


@dataclass(frozen=True)
class Best:
    """The best routing so far and its metrics on all searched images (``loss`` ranks it)."""

    routing: Routing
    metrics: dict[str, float]


@dataclass(frozen=True)
class BeforeFill:
    """The beam's best routing before the budget fill: its metrics and FLOPs."""

    metrics: dict[str, float]
    flops: int


@dataclass
class SearchState:
    """Everything a search has decided and spent so far; a strategy resumes from it.

    Attributes:
        fingerprint: the search it belongs to (:func:`fingerprint`).
        step: steps done (beam: layers decided; transition: grid points tried).
        beam: the partial routings kept, as rules in the order they were decided.
        best: the best routing so far (None before the first candidate).
        candidates: candidates evaluated in the steps done.
        block_passes: blocks run over the searched images in the steps done.
        seconds: time spent in the steps done.
        before_fill: set by the beam's budget fill, saved together with the filled routing.
        transition_depth: set by the ``label_free`` strategy.
        forward_backward_passes: batches run forward and backward in the steps done (the ``diffrate`` strategy's).
        extra: JSON-ready data a strategy carries from step to step beyond the fields above (``diffrate``: the rate
            logits, the optimizer's and the scheduler's state; fields under ``report`` go into the search report).
        identity: the parts of the fingerprint by name (:func:`fingerprint`), to name what differs when another
            search refuses the state.
    """

    fingerprint: str
    step: int = 0
    beam: list[tuple[Rule, ...]] = field(default_factory=lambda: [()])
    best: Best | None = None
    candidates: int = 0
    block_passes: float = 0.0
    seconds: float = 0.0
    before_fill: BeforeFill | None = None
    transition_depth: int | None = None
    forward_backward_passes: int = 0
    extra: dict[str, Any] | None = None
    identity: dict[str, Any] | None = None

    def consider(self, routing: Routing, metrics: dict[str, float]) -> None:
        """Make ``routing`` the best so far if its loss is strictly lower (the earlier candidate wins ties)."""
        if self.best is None or metrics["loss"] < self.best.metrics["loss"]:
            self.best = Best(routing, metrics)

    def checkpoint(self, evaluator: Evaluator, path: Path | None, started: float) -> None:
        """Fold the evaluator's counts and the time since ``started`` into the state and save it to ``path``."""
        self.candidates += evaluator.candidates
        self.block_passes += evaluator.block_passes
        self.seconds += time.perf_counter() - started
        evaluator.candidates = evaluator.block_passes = 0
        self.save(path)

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-ready data (rules and routings as the mappings routing files use)."""
        data: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "beam": [[rule.to_dict() for rule in rules] for rules in self.beam],
            "best": None
            if self.best is None
            else {"routing": self.best.routing.to_dict(), "metrics": self.best.metrics},
            "candidates": self.candidates,
            "block_passes": self.block_passes,
            "seconds": self.seconds,
        }
        if self.before_fill is not None:
            data["before_fill"] = {"metrics": self.before_fill.metrics, "flops": self.before_fill.flops}
        if self.transition_depth is not None:
            data["transition_depth"] = self.transition_depth
        if self.forward_backward_passes:
            data["forward_backward_passes"] = self.forward_backward_passes
        if self.extra is not None:
            data["extra"] = self.extra
        if self.identity is not None:
            data["identity"] = self.identity
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        """The state that :meth:`to_json` gave ``data``."""
        best, before_fill = data["best"], data.get("before_fill")
        return cls(
            fingerprint=data["fingerprint"],
            step=data["step"],
            beam=[tuple(check_rule(i, rule) for i, rule in enumerate(rules)) for rules in data["beam"]],
            best=None if best is None else Best(Routing.from_dict(best["routing"]), best["metrics"]),
            candidates=data["candidates"],
            block_passes=data["block_passes"],
            seconds=data["seconds"],
            before_fill=None if before_fill is None else BeforeFill(before_fill["metrics"], before_fill["flops"]),
            transition_depth=data.get("transition_depth"),
            forward_backward_passes=data.get("forward_backward_passes", 0),
            extra=data.get("extra"),
            identity=data.get("identity"),
        )

    def save(self, path: Path | None) -> None:
        """Write the state to ``path`` (nothing without one) atomically: a kill never leaves half a state."""
        if path is not None:
            write_text_atomic(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path | None, fingerprint: str, identity: dict[str, Any] | None = None) -> SearchState | None:
        """The state saved at ``path`` if there is one (None otherwise), for the search of ``fingerprint`` (whose
        parts ``identity`` name what differs in the error).

        Raises:
            UserError: the file is not a search state, or belongs to another search.
        """
        if path is None or not path.exists():
            return None
        if not path.is_file():
            raise UserError(f"search state_path {path} is a directory; give a JSON file path")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"search state {path} is not valid JSON ({error}); delete it to start over") from None
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
            reason = difference(data.get("identity") if isinstance(data, dict) else None, identity)
            raise UserError(
                f"search state {path} belongs to another search ({reason}); delete it or pass another state_path"
            )
        return cls.from_json(data)
