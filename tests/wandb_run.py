"""Read back what an offline W&B run wrote, through wandb's own reader of its run file: ``wandb leet inspect``.

An offline run keeps everything in its ``run-*.wandb`` transaction log (its ``files/`` folder holds no summary or
history JSON). ``wandb leet inspect --json`` prints the log's records one JSON object a line, and with ``--summary``
the run's state, config and final summary as one object. wandb-core buffers the log and closes it when the service
tears the run's stream down, which ``wandb.finish()`` only requests: a test that logs in its own process calls
``wandb.teardown()`` (which waits for the service to exit) before reading; a subprocess's exit does the same.
A run that is not ``finished`` fails the read at once instead of reading back a partial log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoggedRun:
    """One finished W&B run as logged.

    Attributes:
        config: ``wandb.config`` as a nested dict.
        summary: the final summary, nested (a logged table is a dict with ``_type`` ``table-file``).
        history: every value of each history key in logging order (a nested key's parts joined by ``.``).
    """

    config: dict
    summary: dict
    history: dict[str, list]

    @property
    def keys(self) -> set[str]:
        """The history's keys and the summary's top-level keys."""
        return set(self.history) | set(self.summary)


def _inspect(run_dir: Path, *flags: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"wandb leet inspect {run_dir}: {result.stderr[-2000:]}"
    return result.stdout


def read_run(run_dir: Path) -> LoggedRun:
    """The config, summary and history of the finished offline run in ``run_dir``."""
    state = json.loads(_inspect(run_dir, "--summary"))
    assert state["state"] == "finished", f"{run_dir}: the run is {state['state']!r}, not finished (torn down?)"
    history: dict[str, list] = {}
    for line in _inspect(run_dir).splitlines():
        record = json.loads(line)
        if record["type"] == "history":
            for key, value in record["history"]["item"].items():
                history.setdefault(key, []).append(value)
    return LoggedRun(config=state["config"], summary=state["summary"], history=history)
