"""Checks of the numbers (and dtypes) a user passes or a file holds, and the one way a
validating function reports what it found.

Booleans are not numbers here (``True`` is not a rank of 1); NumPy scalars are.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def is_number(value: Any, kind: type = numbers.Real) -> bool:
    """Whether ``value`` is a number of ``kind`` (`numbers.Real`, `numbers.Integral`),
    not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool | np.bool_)


def is_int(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool) ``>= minimum``."""
    return is_number(value, numbers.Integral) and value >= minimum


def is_positive(value: Any) -> bool:
    """Whether ``value`` is a finite number ``> 0`` (an alpha, a learning-rate ratio)."""
    return is_number(value) and 0 < value < math.inf


def is_float_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` names a floating dtype (``jnp.bfloat16``, ``"float32"``)."""
    try:  # np.dtype(None) is float64; np.issubdtype rejects bfloat16
        return dtype is not None and jnp.issubdtype(np.dtype(dtype), jnp.floating)
    except TypeError:
        return False


def raise_problems(
    header: str, problems: Sequence[str], error: type[Exception] = ValueError, *, hint: str = ""
) -> None:
    """Raises ``error`` listing every problem, one per indented line, if there are any.

    Validating code collects every problem it finds before raising, so that one run
    names them all: ``header:`` then the problems, then ``hint`` on its own line.
    """
    if problems:
        message = f"{header}:\n  " + "\n  ".join(problems)
        raise error(message + (f"\n{hint}" if hint else ""))
