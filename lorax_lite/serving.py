"""Per-example serving: every example of a batch runs with its own adapter, in one call.

`route` wraps a model function like `ll.lora` does, taking an `AdapterSet` and one adapter
id per example: the base product stays one matmul over the batch, the adapter path becomes
batched matmuls over each example's factors, gathered where they are used (see
`AdapterSet.per_example`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .adapter_set import AdapterSet
from .transform import lora


def route(fn: Callable, *, strict: bool = False) -> Callable:
    """Makes ``fn`` run each example of a batch with its own adapter, in one call.

    The routed function takes an `AdapterSet` and an ``adapter_ids`` vector (one id
    per example; ``-1``: the base model). Under ``jax.vmap`` over the examples, each
    example gets its adapter's factors (gathered by id where each is used: inside a
    scan over layers, one layer per step) while the base weights stay unbatched: the
    base product stays one matmul over the whole batch and the adapter path becomes
    batched matmuls. No loop over adapters, no sub-batching.

    Args:
        fn: the model function ``fn(params, *batch, **kwargs)``, e.g. ``model.apply``;
            it sees each example as a batch of one, and its outputs must keep that
            leading batch axis (per-example outputs, not a batch mean).
        strict: as for `ll.lora`.

    Returns:
        ``routed(adapters, adapter_ids, *batch, dropout_key=None, **kwargs)``: every
        ``batch`` leaf has the examples on axis 0; keyword arguments are passed to
        every example unbatched; with a ``dropout_key``, each example draws its own
        masks. Returns ``fn``'s outputs stacked over the examples. Under ``jax.jit``
        the ids are traced and cannot be checked: an id outside ``[-1, len(adapters))``
        makes that example's output NaN (see `AdapterSet.select`).

    Raises:
        TypeError: from ``routed``, for ids that are not integers.
        ValueError: from ``routed``, for ids that are not one per example (a vector as
            long as every batch leaf's leading axis), or concrete ids out of range.

    Example:
        >>> routed = jax.jit(route(model.apply))  # doctest: +SKIP
        >>> logits = routed(adapters, jnp.array([0, 2, -1, 0]), tokens)  # doctest: +SKIP
    """
    apply = lora(fn, strict=strict)

    def one_example(kwargs, tree, example, key):
        batch_of_one = jax.tree_util.tree_map(lambda x: x[None], example)
        out = apply(tree, *batch_of_one, dropout_key=key, **kwargs)
        return jax.tree_util.tree_map(lambda y: y[0], out)

    @functools.wraps(fn)
    def routed(
        adapters: AdapterSet,
        adapter_ids: jax.Array,
        *batch: Any,
        dropout_key: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        if not isinstance(adapters, AdapterSet):
            raise TypeError(f"routed: expected an AdapterSet, got {type(adapters).__name__}")
        ids = _check_ids(adapter_ids, batch, len(adapters))
        keys = None if dropout_key is None else jax.random.split(dropout_key, ids.shape[0])
        # The factors stay stacked, each example holding its index (Gathered): gathered
        # where used, per layer inside a scan, never every layer's up front. The keyword
        # arguments are closed over: kwargs may hold Python values (flags) that the
        # model branches on.
        tree, axes = adapters.per_example(ids)
        mapped = jax.vmap(functools.partial(one_example, kwargs), in_axes=(axes, 0, 0))
        return mapped(tree, batch, keys)

    return routed


def _check_ids(adapter_ids: Any, batch: tuple, n: int) -> jax.Array:
    """``adapter_ids`` as int32, checked: a vector, one per example, in ``[-1, n)`` if concrete."""
    ids = jnp.asarray(adapter_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"adapter_ids must be integers, got dtype {ids.dtype}")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(batch)}
    if ids.ndim != 1 or sizes - {ids.shape[0]}:
        raise ValueError(
            f"adapter_ids must be a vector with one id per example; got shape {ids.shape} "
            f"for batch leaves with leading sizes {sorted(sizes, key=str)}"
        )
    if not isinstance(ids, jax.core.Tracer):
        concrete = np.asarray(ids)
        bad = np.unique(concrete[(concrete < -1) | (concrete >= n)])
        if bad.size:
            raise ValueError(f"adapter_ids {bad.tolist()} outside [-1, {n}) (-1: the base model)")
    return ids.astype(jnp.int32)
