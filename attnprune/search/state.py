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
from torch import nn

from attnprune.errors import UserError
from attnprune.routing import Routing, Rule
from attnprune.routing.rules import check_rule
from attnprune.search.evaluator import Evaluator

__all__ = ["Best", "BeforeFill", "SearchState", "fingerprint"]


def fingerprint(model: nn.Module, settings: dict[str, Any], evaluator: Evaluator) -> str:
    """Identifies a search: its settings, every weight of the model and the searched images and labels, so that a
    state saved for another model (even one differing only in its head) or other data is never resumed."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    labels = [y for y in evaluator.labels if y is not None]
    for tensor in [*model.state_dict().values(), *evaluator.raw, *labels]:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


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
        )

    def save(self, path: Path | None) -> None:
        """Write the state to ``path`` (nothing without one) atomically: a kill never leaves half a state."""
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.to_json(), indent=1))
            tmp.replace(path)

    @classmethod
    def load(cls, path: Path | None, fingerprint: str) -> SearchState | None:
        """The state saved at ``path`` if there is one (None otherwise).

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
            raise UserError(
                f"search state {path} belongs to another search (model, data, budget or settings differ); "
                "delete it or pass another state_path"
            )
        return cls.from_json(data)
