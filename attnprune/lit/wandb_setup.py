"""The W&B logger before a run starts: offline without an API key, and offline too, in one printed line, when its
server does not answer within a few seconds.

With an API key and no network, ``wandb.init`` waits about 100 seconds and then fails, leaving a half-made run folder.
So before the run starts, :func:`prepare_wandb` asks the server for any answer (:func:`unreachable`, at most
:data:`PROBE_SECONDS`); without one the run logs offline (a whole offline run, uploaded later with ``wandb sync``),
and one line on stderr says so.
"""

from __future__ import annotations

import netrc
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

__all__ = ["PROBE_SECONDS", "prepare_wandb", "unreachable", "wandb_base_url", "wandb_offline"]

PROBE_SECONDS = 3.0


def wandb_offline() -> bool:
    """True unless W&B can log online: an API key in ``WANDB_API_KEY`` or ``~/.netrc`` and no ``WANDB_MODE=offline``.

    Whether the server answers is asked before the run starts (:func:`prepare_wandb`)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def wandb_base_url() -> str:
    """The W&B server wandb would log to: its settings files (``wandb login --host``), then ``WANDB_BASE_URL``."""
    from wandb import Settings

    settings = Settings()
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings.base_url


def unreachable(url: str, seconds: float = PROBE_SECONDS) -> str | None:
    """Why ``url`` gives no HTTP answer within ``seconds`` (name resolution included), or None when it answers (any
    status: an error status is an answer). Proxies in the environment are used, as wandb uses them."""
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(url, timeout=seconds).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except (OSError, ValueError) as err:
            outcome.append(str(getattr(err, "reason", err)))

    thread = threading.Thread(target=ask, daemon=True)  # a name lookup ignores the timeout: not waited for
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else f"no answer within {seconds:g} s"


def _goes_online(logger: WandbLogger) -> bool:
    return not logger._offline and logger._wandb_init.get("mode") not in ("offline", "disabled") and not wandb_offline()


def prepare_wandb(trainer: L.Trainer) -> None:
    """Before a run (after :func:`~attnprune.lit.cli.existing_folders`, so a failed run still removes them), settle
    what wandb would warn about as its run starts: the run's folder exists (wandb looks for the git repository from it,
    and warns that a folder not yet made does not exist), and Lightning's ``anonymous=None``, a setting wandb dropped,
    is left out. A logger that would log online whose server gives no answer within :data:`PROBE_SECONDS` logs offline
    instead, and one line on stderr says so (rank zero, the one that starts the run)."""
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is not None:
            continue
        init = logger._wandb_init  # Lightning keeps wandb.init's arguments here until the run starts
        if init.get("anonymous") is None:
            init.pop("anonymous", None)
        if logger.save_dir:
            Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero and _goes_online(logger):
            url = wandb_base_url()
            reason = unreachable(url)
            if reason is not None:
                init["mode"] = "offline"
                runs = Path(logger.save_dir or ".") / "wandb"
                sys.stderr.write(
                    f"W&B server {url} cannot be reached ({reason}): logging offline to {runs}/offline-run-*; "
                    f"upload it later with `wandb sync {runs}`\n"
                )
