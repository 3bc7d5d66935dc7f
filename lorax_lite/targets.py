"""Leaf paths, pattern matching and the choice of which leaves to adapt.

Every leaf is named by one string, its ``/``-joined key path
(``params/encoder/layer_0/attention/query/kernel``); every pattern, message and
report in the library uses that name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Predicate = Callable[[str, Any], bool]


def path_str(path: tuple) -> str:
    """The ``/``-joined name of a JAX key path.

    Example:
        >>> path_str((jax.tree_util.DictKey("dense"), jax.tree_util.DictKey("kernel")))
        'dense/kernel'
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of ``tree``, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(path), leaf) for path, leaf in flat]


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether regex ``pattern`` matches one or more whole components of ``path``.

    ``"query"`` matches ``attn/query/kernel`` but not ``attn/query_proj/kernel``;
    ``"layer_[0-3]/.*"`` and ``"attn/query"`` match across components.
    """
    return re.search(rf"(?:^|/)(?:{pattern})(?:/|$)", path) is not None


NOT_WEIGHTS = frozenset({"bias", "scale"})


def leaf_name(path: str) -> str:
    """The name of a leaf: its last path component, or the one before an NNX ``value``.

    ``nnx.split`` states name a kernel ``linear/kernel/value``; its name is ``kernel``.
    """
    parts = path.split("/")
    return parts[-2] if len(parts) > 1 and parts[-1] == "value" else parts[-1]


def is_adaptable(path: str, leaf: Any) -> bool:
    """A float array of rank >= 2 that is no bias or norm scale (a kernel, an embedding)."""
    return (
        leaf_name(path) not in NOT_WEIGHTS
        and hasattr(leaf, "shape")
        and len(leaf.shape) >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)  # np.issubdtype rejects bfloat16
    )


def is_bias(path: str, leaf: Any) -> bool:
    """An array named ``bias`` (1-D, or more for DenseGeneral and stacked layers)."""
    return leaf_name(path) == "bias" and hasattr(leaf, "shape")


def module_of(path: str) -> str:
    """The path of the module holding a leaf (the path without the leaf's name)."""
    parts = path.split("/")
    n_name = 2 if len(parts) > 1 and parts[-1] == "value" else 1
    return "/".join(parts[:-n_name])


def to_predicate(spec: str | Predicate, *, linear_paths: Iterable[str] | None = None) -> Predicate:
    """Turns a target spec into one predicate ``(path, leaf) -> bool``.

    Args:
        spec: a regex (see `pattern_matches`), a callable ``(path, leaf) -> bool``, or
            ``"all-linear"``.
        linear_paths: paths of leaves known to be used as matmul weights (from a
            trace of the model). Without them ``"all-linear"`` goes by name alone: every
            leaf named ``kernel``, conv kernels included (`init` then refuses any kernel
            of more than two axes as ambiguous unless ``axes`` names its roles).

    Returns:
        The predicate.
    """
    if callable(spec):
        return spec
    if spec == "all-linear":
        if linear_paths is not None:
            linear = frozenset(linear_paths)
            return lambda path, leaf: path in linear
        return lambda path, leaf: leaf_name(path) == "kernel"
    return lambda path, leaf: pattern_matches(spec, path)


def closest_paths(pattern: str, paths: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` paths with a component most similar to ``pattern``, for error messages."""

    def score(path: str) -> float:
        parts = path.split("/")
        return max(difflib.SequenceMatcher(None, pattern, part).ratio() for part in parts)

    return sorted(paths, key=score, reverse=True)[:n]


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of ``/``-joined leaf paths, the inverse of `named_leaves` on dicts.

    Example:
        >>> unflatten({"dense/kernel": 1, "dense/bias": 2})
        {'dense': {'kernel': 1, 'bias': 2}}
    """
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return tree
