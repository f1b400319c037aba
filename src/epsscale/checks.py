"""Argument checks shared by the library: what counts as a number, an integer, a count.

Python's ``bool`` is an ``int``; a flag passed where a number belongs is almost always a mistake,
so none of these accept it. Each check returns the value (as a plain Python number) or raises a
one-line ``ValueError`` that names the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["is_real", "is_int", "check_int", "check_number"]


def is_real(v: Any) -> bool:
    """A real number that is not a bool (Python, numpy; not a tensor)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_int(v: Any, name: str, *, low: int = 1) -> int:
    """``v`` as an int >= ``low``; else ``ValueError("name must be an integer >= low, got v")``."""
    if not is_int(v) or int(v) < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return int(v)


def check_number(v: Any, name: str, *, low: float | None = None, strict: bool = False, finite: bool = True) -> float:
    """``v`` as a float: a real number (a 0-d tensor is accepted), finite unless ``finite=False``,
    and >= ``low`` (> ``low`` with ``strict``) when ``low`` is given."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool:
        v = v.item()
    ok = is_real(v) and (not finite or math.isfinite(v))
    if ok and low is not None:
        ok = v > low if strict else v >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number{bound}, got {v!r}")
    return float(v)
