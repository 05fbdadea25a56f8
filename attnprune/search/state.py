"""The resumable state of a search: saved atomically after every step, refused by any other search."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnprune.errors import UserError
from attnprune.search.evaluator import Evaluator

__all__ = ["fingerprint", "load_state", "save_state", "checkpoint", "new_state"]


def fingerprint(model: nn.Module, settings: dict[str, Any], evaluator: Evaluator) -> str:
    """Identifies a search: its settings, every weight of the model and the searched images and labels, so that a
    state saved for another model (even one differing only in its head) or other data is never resumed."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    labels = [y for y in evaluator.labels if y is not None]
    for tensor in [*model.state_dict().values(), *evaluator.raw, *labels]:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def new_state(fingerprint: str) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "step": 0,
        "beam": [[]],
        "best": None,
        "candidates": 0,
        "block_passes": 0.0,
        "seconds": 0.0,
    }


def load_state(path: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The saved state at ``path`` if there is one (None otherwise).

    Raises:
        ValueError: the file is not a search state, or belongs to another search.
    """
    if path is None or not path.exists():
        return None
    if not path.is_file():
        raise UserError(f"search state_path {path} is a directory; give a JSON file path")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"search state {path} is not valid JSON ({error}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise UserError(
            f"search state {path} belongs to another search (model, data, budget or settings differ); "
            "delete it or pass another state_path"
        )
    return state


def save_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)  # atomic: a kill never leaves half a state


def checkpoint(state: dict[str, Any], evaluator: Evaluator, path: Path | None, started: float) -> None:
    """Fold the evaluator's counts and the step's time into ``state`` and save it."""
    state["candidates"] += evaluator.candidates
    state["block_passes"] += evaluator.block_passes
    state["seconds"] += time.perf_counter() - started
    evaluator.candidates = evaluator.block_passes = 0
    save_state(path, state)
