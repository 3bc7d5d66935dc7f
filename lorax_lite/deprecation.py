"""Old spellings of the public API, kept one release as aliases that warn.

One helper for every rename, so each alias warns the same way and is tested the same way.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warns ``DeprecationWarning`` that ``old`` is spelled ``new`` now.

    Args:
        old: the deprecated spelling, as a user writes it (``"place(data_axis=)"``).
        new: the spelling to use instead.
        stacklevel: passed to `warnings.warn` (the default points at the user's call
            of a function that calls this).
    """
    message = f"{old} is deprecated and will be removed in the next release; use {new}"
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**renames: str) -> Callable[[Callable], Callable]:
    """Decorates a function so each old keyword ``old=new`` still works, with a warning.

    Args:
        **renames: old keyword name -> new keyword name.

    Returns:
        A decorator; the decorated function keeps its signature and docstring, and a call
        passing both an old name and its new one raises ``TypeError``.

    Example:
        >>> @renamed_keywords(ids="adapter_ids")
        ... def pick(*, adapter_ids): return adapter_ids
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     pick(ids=3), caught[0].category.__name__
        (3, 'DeprecationWarning')
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}: pass {new}= alone, not also {old}=")
                    warn(f"{fn.__name__}({old}=)", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
