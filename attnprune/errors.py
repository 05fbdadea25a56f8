"""Errors the user can fix, and the finiteness checks that turn silent NaN answers into such errors.

A :class:`UserError` says what input is wrong (the file, the field, the value) and how to fix it. The command lines
print it as one line and exit with status 2 (see :mod:`attnprune.cli`); any other exception is a bug and keeps its
traceback. It is a ``ValueError`` (and :class:`UserTypeError` also a ``TypeError``), so code that catches the usual
Python errors keeps working.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AllRanksError",
    "UserError",
    "UserTypeError",
    "HubUnavailableError",
    "check_finite",
    "check_number",
    "check_finite_outputs",
]


class UserError(ValueError):
    """Bad input, named in the message: a value out of range, an unknown name, a file that does not fit."""


class UserTypeError(UserError, TypeError):
    """Bad input of the wrong kind: a model that is not a ViT, an argument that is not a routing."""


class AllRanksError(UserError):
    """A user error raised on every rank of a data-parallel run with the same message (the command lines print it
    once, on rank 0).

    Args:
        message: the error, as the rank that found it raised it.
        rank: the rank raising this copy.
    """

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class HubUnavailableError(UserError, OSError):
    """A hub name could not be loaded (offline, no cache): the user's to fix, by passing a local file."""


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Refuse a setting that is not a number (an integer with ``integer``; never a bool, never NaN) within
    ``low``..``high`` (each bound included unless open; None: unbounded).

    Raises:
        UserError: ``{name} must be {the range}, got {value!r}``.

    Example:
        >>> check_number("hflip", 5, 0, 1)
        Traceback (most recent call last):
        ...
        attnprune.errors.UserError: hflip must be a number in [0, 1], got 5
    """
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    what = "an integer" if integer else "a number"
    lo, hi = (f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))  # integer bounds in full
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    elif low is not None:
        span = f"{'above' if low_open else 'of at least'} {lo}"
    else:
        span = f"{'below' if high_open else 'of at most'} {hi}"
    raise UserError(f"{name} must be {what} {span}, got {value!r}")


def check_finite(state: dict[str, Any], source: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run's checkpoint gives wrong answers, not an error).

    Raises:
        UserError: naming ``source`` and the first non-finite tensor.
    """
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(
                f"{source}: weight {name!r} holds {bad} non-finite values (NaN or inf); expected finite weights"
            )


def check_finite_outputs(outputs: Tensor, source: str, where: str = "the first batch") -> None:
    """Refuse outputs holding NaN or infinity: finite weights can still overflow (an input scaled wrongly, a
    precision too narrow), and top-1 on NaN logits is a wrong answer, not an error.

    Args:
        outputs: the model's logits (or features) on ``where``.
        source: the model, as the user named it.
        where: the images the outputs are of.

    Raises:
        UserError: naming ``source``, ``where`` and how many values are not finite.
    """
    if torch.is_tensor(outputs) and outputs.is_floating_point() and not bool(torch.isfinite(outputs).all()):
        bad = int((~torch.isfinite(outputs)).sum())
        raise UserError(
            f"{source}: the model's outputs on {where} hold {bad} non-finite values (NaN or inf) of "
            f"{outputs.numel()}; expected finite logits (check the weights, the input scaling and the precision)"
        )
