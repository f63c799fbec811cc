"""Type tests and checks for the values a config or a caller passes: Python counts a bool as an integer, and NaN as
a number."""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """Whether `value` is an integer (not a bool, which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether `value` is a real number (not a bool nor a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """Whether `value` is a real number other than NaN and the infinities."""
    return is_number(value) and math.isfinite(value)


def check_int(key: str, value, minimum: int, hint: str = "") -> None:
    """`ValueError` naming `key` unless `value` is an integer >= `minimum`."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}{hint}, got {value!r}")


def check_fraction(key: str, value) -> None:
    """`ValueError` naming `key` unless `value` is a number in [0, 1]."""
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
