"""The value checks every config and option parser shares; each error names the value as the user gave it
(``label``: a CLI flag such as ``--batch-size``, or ``mean in preprocess.json``), the bad value and what is allowed.

Integers and numbers may be Python or numpy scalars; a bool is neither.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from onnxsparse.errors import OnnxSparseError


def check(condition: bool, message: str) -> None:
    """Raise :class:`OnnxSparseError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise OnnxSparseError(message)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_at_least(value: Any, label: str, minimum: int = 1) -> int:
    """``value`` as an int, when it is an integer >= ``minimum``."""
    check(is_int(value) and value >= minimum, f"{label} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def optional_int_at_least(value: Any, label: str, minimum: int = 1) -> int | None:
    """None, or ``value`` as an int when it is an integer >= ``minimum``."""
    return None if value is None else int_at_least(value, label, minimum)


def boolean(value: Any, label: str) -> bool:
    """``value``, when it is True or False."""
    check(isinstance(value, bool), f"{label} must be True or False, got {value!r}")
    return value


def number_in(value: Any, label: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float, when it is a finite number in the interval (closed unless ``lo_open``/``hi_open``)."""
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    check(ok, f"{label} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {value!r}")
    return float(value)


def one_of(value: Any, label: str, allowed: Sequence[str], *, ignore_case: bool = False) -> str:
    """``value`` (lower-cased with ``ignore_case``), when it is one of the strings ``allowed``."""
    ok = isinstance(value, str) and (value.lower() if ignore_case else value) in allowed
    check(ok, f"{label} must be one of {', '.join(allowed)}, got {value!r}")
    return value.lower() if ignore_case else value
