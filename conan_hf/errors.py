"""User and data errors, and how the command lines report them.

A :class:`DataError` means the *input* is wrong (a data file, a config value, a command-line argument), not the code:
its message is one line that says where (``file:line`` for data, 1-based), what is wrong and how to fix it. The command
lines (``conan-train <stage>``, ``examples/finetune.py``, ``conan-eval``, ``conan-clr``) wrap their ``main``
in :func:`cli_errors`, which prints that line on stderr and exits with status 2 — no traceback. Any other exception is
a bug and keeps its traceback.

Example::

    >>> from conan_hf.errors import DataError
    >>> str(DataError("score is 'nan', not a finite number", where="sts.csv:5", hint="fix or remove the row"))
    "sts.csv:5: score is 'nan', not a finite number; fix or remove the row"
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_SCORE_RANGE",
    "USER_ERROR_EXIT_CODE",
    "DataError",
    "DataFileNotFoundError",
    "OneLineArgumentParser",
    "check_score_range",
    "cli_errors",
    "finite_float",
    "location_of",
    "score_range_of",
]

#: The scale of STS gold scores unless a task declares its own (STS-B's 0-5).
DEFAULT_SCORE_RANGE = (0.0, 5.0)

#: Exit status of a command line stopped by a :class:`DataError` (argparse uses 2 for bad arguments as well).
USER_ERROR_EXIT_CODE = 2

F = TypeVar("F", bound=Callable[..., Any])


class DataError(ValueError):
    """Bad user input. ``str(error)`` is ``"<where>: <what>; <hint>"`` (parts that are not given are left out).

    Args:
        message: what is wrong.
        where: the place, e.g. ``"data/sts.csv:5"`` (file and 1-based line) or ``"demo row 3"``.
        hint: how to fix it.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.where, self.reason, self.hint = where, message, hint
        text = f"{where}: {message}" if where else message
        super().__init__(f"{text}; {hint}" if hint else text)


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder named by the user does not exist (also a `FileNotFoundError`)."""


def location_of(row: Any, fallback: str | None = None) -> str | None:
    """Where a data row was read (``"file:line"``, ``"demo row 3"``), as carried by
    :class:`conan_hf.data.readers.Row` or in the ``_location`` column of :mod:`conan_hf.data.sources` datasets;
    ``fallback`` for rows that do not carry it."""
    where = getattr(row, "location", None)
    if where is None and isinstance(row, dict):
        where = row.get("_location")
    return where or fallback


def finite_float(value: Any) -> float:
    """``float(value)`` for numbers and numeric strings, refusing NaN, ±inf and booleans (a `ValueError` saying so).

    Used for scores: a NaN score is silently ignored by CoSENT and makes evaluation metrics undefined.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean, not a number")
    if not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is a {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def check_score_range(score: float, score_range: Any, where: str | None, option: str = "score_range") -> None:
    """Raise a :class:`DataError` at ``where`` when an STS gold ``score`` is outside ``score_range`` (``[low, high]``,
    ends included): a score off the task's scale (7.5 on 0-5) is a data error, and would distort CoSENT's ranking and
    the evaluation's similarity scale. ``option`` is how the user declares another scale (named in the hint).

    Example:
        >>> check_score_range(4.5, (0, 5), "sts.csv:3")   # fine; 7.5 raises "sts.csv:3: score 7.5 is outside ..."
    """
    low, high = score_range
    if not low <= score <= high:
        raise DataError(f"score {score:g} is outside the task's range [{low:g}, {high:g}]", where=where,
                        hint=f"fix the row, or declare the scale with {option}")


def score_range_of(value: Any, where: str) -> tuple[float, float]:
    """``value`` (two numbers, low < high) as a score range, else a :class:`DataError` at ``where``."""
    try:
        low, high = (finite_float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"score_range must be two numbers [LOW, HIGH], got {value!r}", where=where,
                        hint="e.g. score_range: [0, 5]") from None
    if not low < high:
        raise DataError(f"score_range must have LOW < HIGH, got {value!r}", where=where, hint="e.g. [0, 5]")
    return low, high


def _one_line(text: str) -> str:
    return " ".join(text.split())


class OneLineArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors are one line too (argparse prints the usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {_one_line(message)}; see {self.prog} --help", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE)


def cli_errors(prog: str) -> Callable[[F], F]:
    """Decorator for a command line's ``main``: a :class:`DataError` becomes one line on stderr,
    ``"<prog>: error: <message>"``, and ``SystemExit(2)``. Other exceptions propagate with their traceback.
    """

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except DataError as error:
                sys.stdout.flush()
                print(f"{prog}: error: {_one_line(str(error))}", file=sys.stderr, flush=True)
                raise SystemExit(USER_ERROR_EXIT_CODE) from None

        return wrapper  # type: ignore[return-value]

    return decorate
