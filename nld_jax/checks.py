"""Argument checks with named errors: what generate() and each mode's Settings validate with.

Each check takes the argument's name and value and returns the value in canonical form (int,
float) or raises TypeError (wrong type) or ValueError (out of range) naming the argument, e.g.
`seed=2**70 must be an integer in [-2**63, 2**64)`. bool is refused where a number is meant.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["integer", "real"]


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None,
            high_open: bool = False) -> int:
    """An integer (Python or numpy) in [low, high] (high excluded with high_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer, got {type(value).__name__}")
    value = int(value)
    if ((low is not None and value < low) or (high is not None and value > high)
            or (high_open and high is not None and value == high)):
        if high is None and low in (0, 1):
            kind = "a positive integer" if low == 1 else "a non-negative integer"
            raise ValueError(f"{name}={value!r} must be {kind}")
        raise ValueError(f"{name}={value!r} must be an integer in "
                         f"{_interval(low, high, False, high_open)}")
    return value


def real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (int or float, Python or numpy) in the given interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    if ((low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))):
        raise ValueError(f"{name}={value!r} must be in "
                         f"{_interval(low, high, low_open, high_open)}")
    return value
