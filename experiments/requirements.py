"""What an experiment's real run needs installed, checked before it starts."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any


def check_installed(
    target: str, modules: Sequence[str], locate: Sequence[Callable[[], Any]]
) -> None:
    """Exits with a clear message if something the real run needs is missing.

    Args:
        target: the Makefile target that installs everything, e.g. ``"demo"``.
        modules: importable packages the run needs.
        locate: callables that find the run's model and data files; each raises
            ``ModuleNotFoundError`` naming the missing wheel.

    Raises:
        SystemExit: with the message of the first thing missing.
    """
    try:
        for find in locate:
            find()
        for module in modules:
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(
                    f"The `{module}` package is not installed. Run `make {target}`, which "
                    f"installs it, or `pip install {module}`."
                )
    except ModuleNotFoundError as err:
        raise SystemExit(str(err)) from err
