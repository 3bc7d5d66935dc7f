"""Shared tree assertions and fixtures-as-functions for the test suite."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

import lorax_lite as ll
from lorax_lite.weight import is_lora_node


def assert_trees_allclose(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-6):
    """Same structure, and every leaf close (relative to the leaf's largest magnitude)."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e, f"structures differ:\n{tree_a}\n{tree_e}"
    for (path, a), e in zip(flat_a, flat_e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, f"{jax.tree_util.keystr(path)}: {a.shape} != {e.shape}"
        scale = max(np.abs(e).max(initial=0.0), 1e-30)
        err = np.abs(a - e).max(initial=0.0)
        assert err <= atol + rtol * scale, (
            f"{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > {atol} + {rtol} * {scale:.3g}"
        )


def assert_trees_equal(actual: Any, expected: Any):
    """Same structure, dtypes and bits."""
    flat_a, tree_a = jax.tree_util.tree_flatten(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        assert np.asarray(a).dtype == np.asarray(e).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def randomize_b(tree: Any, key: jax.Array, std: float = 0.5) -> Any:
    """Gives every adapter a non-zero B, so that adapters change the model's output."""
    nodes, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_lora_node)
    keys = iter(jax.random.split(key, len(nodes)))
    out = []
    for node in nodes:
        k = next(keys)
        if isinstance(node, ll.LoraWeight):
            b = std * jax.random.normal(k, node.b.shape, node.b.dtype)
            node = dataclasses.replace(node, b=b)
        out.append(node)
    return jax.tree_util.tree_unflatten(treedef, out)


def dense_reference(node: ll.LoraWeight) -> np.ndarray:
    """``w + scale * A @ B`` in float64 numpy, by einsum over the layout's axis roles."""
    w = np.asarray(node.w, np.float64)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    letters = "abcdefghijklmnopqrstuvwxy"[: w.ndim]
    pick = lambda axes: "".join(letters[i] for i in axes)
    stack, fan_in, fan_out = (pick(axes) for axes in node.layout)
    delta = np.einsum(f"{stack}{fan_in}z,{stack}z{fan_out}->{letters}", a, b)
    return w + node.scale * delta
