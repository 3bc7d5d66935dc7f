"""JSON values that checkpoints carry: checked before writing, digested, clipped for messages."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .checks import raise_problems


def check_json(value: Any, caller: str, name: str) -> None:
    """Raises ``TypeError`` naming every part of ``value`` that JSON would not round-trip.

    Allowed: dicts with string keys, lists, tuples, strings, bools, None, ints and
    floats (Python's, or subclasses such as ``np.float64``).
    """
    raise_problems(
        f"{caller}: {name} must be JSON-serializable; these parts are not",
        _json_problems(value, name),
        TypeError,
        hint="(convert NumPy and JAX scalars with int(...) or float(...))",
    )


def _json_problems(value: Any, where: str) -> list[str]:
    if isinstance(value, Mapping):
        problems = []
        for key, item in value.items():
            if isinstance(key, str):
                problems += _json_problems(item, f"{where}[{key!r}]")
            else:
                problems.append(
                    f"{where}: key {key!r} ({_type_name(key)}) is not a string, as JSON keys are"
                )
        return problems
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in _json_problems(item, f"{where}[{i}]")]
    if value is None or isinstance(value, str | bool | int | float):
        return []
    shown = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
    return [f"{where}: {_type_name(value)} {shown} is not JSON-serializable"]


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def json_digest(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def clipped(value: Any) -> str:
    """``repr(value)``, cut to 80 characters, for messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
