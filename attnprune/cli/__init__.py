"""The command lines (``attnprune-train``, ``-evaluate``, ``-search``, ``-analyze``, ``-quickstart``; ``train.py`` and
the other scripts at the repository's top call them), and their one way to end on a user error: exit status 2 and
one line on stderr that names the input, without a traceback.

A user error is an :class:`attnprune.errors.UserError` raised by validation, an OS error about a path the user gave
(``FileNotFoundError``, ``IsADirectoryError``, ``NotADirectoryError``), or an argument error of jsonargparse/argparse.
Anything else is a bug and keeps its traceback. A user error that every rank of a data-parallel run raises
(:class:`attnprune.errors.AllRanksError`) is printed once, by rank 0. ``--debug`` on the command line (removed before
parsing) or ``ATTNPRUNE_DEBUG=1`` shows the traceback of user errors too.

The argparse scripts (the quickstart, ``benchmarks/*.py``) build their parser with :class:`ArgumentParser` and
check values as they are parsed, before any data or model is loaded, with the types :func:`fraction`,
:func:`positive_int` and :func:`model_source`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnprune.errors import AllRanksError, UserError
from attnprune.io import WEIGHT_SUFFIXES
from attnprune.strict_yaml import refuse_duplicate_keys_in_configs

__all__ = [
    "USER_ERRORS",
    "ArgumentParser",
    "debug_requested",
    "fraction",
    "is_user_error",
    "lightning_parser_kwargs",
    "model_source",
    "one_line",
    "positive_int",
    "run_cli",
]

USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    argparse.ArgumentError,
)
EXIT_USER_ERROR = 2


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` in ``argv`` or ``ATTNPRUNE_DEBUG`` set to a true value."""
    return "--debug" in argv or os.environ.get("ATTNPRUNE_DEBUG", "").strip().lower() in {"1", "true", "yes"}


_NOISE = re.compile(
    r"^\s*(Given value( type)?:|- Expected a|Subclass types expect|Problem with given class_path|"
    r"Does not validate against any of the Union subtypes|Subtypes:|Errors:\s*$)"
)


def one_line(err: BaseException) -> str:
    """The error's message on one line: jsonargparse's nested reports keep their most specific lines (the 'Given
    value: Namespace(...)' dumps are dropped), and ``raise X(...) from Y`` adds nothing Y's message already had; an
    error re-raised from a DataLoader worker keeps only the original error's message, not the worker's traceback."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback (most recent call last):" in text:  # re-raised from a DataLoader worker: the last line
        last = text.splitlines()[-1].strip()
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
    lines = [line.strip().removeprefix("- ") for line in text.splitlines() if line.strip() and not _NOISE.match(line)]
    if not lines:
        lines = [text.splitlines()[0].strip()]
    return " ".join(lines)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of :data:`USER_ERRORS` or was raised because of one: jsonargparse reports an error of a
    class it instantiates (a module refusing its weights, say) as a ``ValueError`` caused by it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Call ``main(argv)`` (``argv`` default ``sys.argv[1:]``, without ``--debug``); on a user error write
    ``error: <message>`` to stderr and exit with status 2, unless debugging was asked for (then re-raise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_duplicate_keys_in_configs()  # a --config file with a key twice: an error, not the last one winning
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return main(argv)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        if isinstance(err, AllRanksError) and err.rank > 0:  # rank 0 prints it
            raise SystemExit(EXIT_USER_ERROR) from None
        sys.stderr.write(f"error: {one_line(err)} (--debug or ATTNPRUNE_DEBUG=1 for a traceback)\n")
        raise SystemExit(EXIT_USER_ERROR) from None


def lightning_parser_kwargs(subcommands: tuple[str, ...] = ("fit", "validate", "test", "predict")) -> dict:
    """``parser_kwargs`` for a LightningCLI whose argument errors :func:`run_cli` should report: jsonargparse raises
    them instead of printing its usage and exiting."""
    return {"exit_on_error": False, **{name: {"exit_on_error": False} for name in subcommands}}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for the scripts that :func:`run_cli` runs (the quickstart, the benchmarks): every argument
    error (an unknown or missing option, a value its type refuses) is raised, so it ends as one line and exit status 2
    instead of argparse's usage text. The description is printed as written (``--help``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(exit_on_error=False, **kwargs)

    def error(self, message: str) -> None:  # argparse calls it for missing and unknown options
        raise UserError(message)


def fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1] (a FLOPs budget or ratio; NaN is refused)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count of images, rounds, candidates)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text}")
    return value


def model_source(text: str) -> str:
    """An argparse type: a model as :func:`attnprune.load_model` takes it, checked before it is loaded: a file named
    as weights or a checkpoint (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.ckpt``) must exist, and a folder is
    refused; any other name is left to the hub."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; expected a weights file, checkpoint or hub name")
    if path.suffix in (*WEIGHT_SUFFIXES, ".ckpt") and not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist; expected a weights file, checkpoint or hub name")
    return text
