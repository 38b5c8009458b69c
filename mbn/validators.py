"""Value checks shared by recipes, domains, attacks, evaluation and the command lines.

Each check returns the value (as a Python number where it is one) or raises :class:`ValueCheckError`, a
``ValueError`` whose message is ``"<name> must be <what>, got <value>"``. The name is the caller's
(a parameter such as ``eps``); the recipe layer adds the key (``key 'domains.adv': ...``), lower
layers never format recipe keys themselves.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np


class ValueCheckError(ValueError):
    """A value failed a check; ``what`` says what was expected."""

    def __init__(self, name: str, what: str, value: Any) -> None:
        super().__init__(f"{name} must be {what}, got {value!r}")
        self.name, self.what, self.value = name, what, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_num(high)}"
    return "finite"


def is_number(
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> bool:
    """True for a finite real number (not a bool) within the bounds: :func:`check_number`'s test.

    For a caller whose message says more than ``"<name> must be <what>"``.

    Examples:
        >>> is_number(0.5, low=0, high=1), is_number(True), is_number(float("nan")), is_number(0, low=0, low_open=True)
        (True, False, False, False)
    """
    if not _is_number(value) or not math.isfinite(value):
        return False
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return bool(high is None or not (value > high or (high_open and value == high)))


def is_int(value: Any, *, low: int | None = None, high: int | None = None) -> bool:
    """True for an integer (not a bool) within ``[low, high]``: :func:`check_int`'s test.

    Examples:
        >>> is_int(3, low=1), is_int(3.0), is_int(False), is_int(0, low=1)
        (True, False, False, False)
    """
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        return False
    return bool((low is None or value >= low) and (high is None or value <= high))


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    unit: str = "",
) -> float:
    """A finite real number (not a bool) within the bounds; returned as ``float``.

    Examples:
        >>> check_number("eps", 4, low=0)
        4.0
        >>> check_number("eps", -1, low=0, unit="in 0-255 pixel units")
        Traceback (most recent call last):
        ...
        mbn.validators.ValueCheckError: eps must be a number >= 0 in 0-255 pixel units, got -1
    """
    if not is_number(value, low=low, high=high, low_open=low_open, high_open=high_open):
        what = f"a number {_bounds(low, high, low_open, high_open)}" + (f" {unit}" if unit else "")
        raise ValueCheckError(name, what, value)
    return float(value)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) within ``[low, high]``; returned as ``int``."""
    if not is_int(value, low=low, high=high):
        what = f"an integer {_bounds(low, high, False, False)}" if low is not None or high is not None else "an integer"
        raise ValueCheckError(name, what, value)
    return int(value)


def check_probability(name: str, value: Any) -> float:
    """A number in [0, 1]; ``True``/``False`` count as 1/0 (an on/off switch that may also be a rate)."""
    if isinstance(value, bool):
        return float(value)
    if not is_number(value, low=0.0, high=1.0):
        raise ValueCheckError(name, "a bool or a probability in [0, 1]", value)
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueCheckError(name, "true or false", value)
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueCheckError(name, f"one of {list(choices)}", value)
    return value
